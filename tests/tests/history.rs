//! History and recovery (docs/REFERENCE.md §5): the real publisher appends every message to a
//! per-channel stream and publishes it with an offset; a client that comes back with `since` (at
//! connect or on subscribe) gets exactly what it missed, in order, then the live stream, or
//! `history_gone` when the offset can no longer be resumed from.

use std::process::Stdio;
use tests::Frames;

use serde_json::{json, Value};
use tests::{
    eventually, expect_error, expect_quiet, expect_sequence, http_request, publish,
    publish_in_background, publisher_command, stream_id, Cluster, PublisherNode, WsClient, TIMEOUT,
};

/// A publisher without ticks (they would only be noise here).
async fn publisher(cluster: &Cluster, env: &[(&str, &str)]) -> PublisherNode {
    let mut all = vec![("PUBLISHER__TICK__ENABLED", "false")];
    all.extend_from_slice(env);
    PublisherNode::start(&cluster.redis, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_messages_carry_offsets_and_plain_publishes_do_not() {
    let cluster = Cluster::start(1).await;
    let publisher = publisher(&cluster, &[]).await;
    let node = &cluster.nodes[0];
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=h:o")).await;

    let offset = publish(publisher.port, "h:o", 1).await;
    let frame = client.until_message("h:o").await;
    assert_eq!(frame["data"], json!({"n": 1}));
    assert_eq!(frame["offset"], offset.as_str());

    cluster.redis.cli(&["PUBLISH", "h:o", r#"{"n":2}"#]);
    let frame = client.until_message("h:o").await;
    assert_eq!(frame["data"], json!({"n": 2}));
    assert!(
        frame.get("offset").is_none(),
        "plain PUBLISH got an offset: {frame}"
    );

    // The CLI publishes through the same script.
    let status = publisher_command()
        .env("PUBLISHER__REDIS__URL", cluster.redis.url())
        .args(["publish", "h:o", r#"{"n":3}"#])
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run publisher publish");
    assert!(status.success());
    let frame = client.until_message("h:o").await;
    assert_eq!(frame["data"], json!({"n": 3}));
    let cli_offset = frame["offset"].as_str().expect("CLI message has an offset");
    assert_eq!(
        cli_offset.split_once(':').unwrap().0,
        offset.split_once(':').unwrap().0
    );
    assert!(stream_id(cli_offset) > stream_id(&offset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_since_gets_exactly_what_it_missed_then_live() {
    let cluster = Cluster::start(2).await;
    let publisher = publisher(&cluster, &[]).await;
    let (mut client, _) =
        WsClient::connect_welcomed(&cluster.nodes[0].ws_url("channels=h:r")).await;
    for n in 1..=3 {
        publish(publisher.port, "h:r", n).await;
    }
    let last = expect_sequence(&mut client, "h:r", 1, 3).await;
    drop(client);

    // Missed while away, then a burst racing the reconnect (to the other node).
    for n in 4..=8 {
        publish(publisher.port, "h:r", n).await;
    }
    let burst = publish_in_background(publisher.port, "h:r", 9..=40);
    let url = cluster.nodes[1].ws_url(&format!("channels=h:r&since=h:r@{last}"));
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    let last = expect_sequence(&mut client, "h:r", 4, 40).await;
    burst.await.unwrap();
    expect_quiet(&mut client, "h:r").await;

    // Live afterwards.
    let offset = publish(publisher.port, "h:r", 41).await;
    let frame = client.until_message("h:r").await;
    assert_eq!(frame["data"]["n"], 41);
    assert_eq!(frame["offset"], offset.as_str());
    assert!(stream_id(&offset) > stream_id(&last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_since_replays_after_subscribed_then_goes_live() {
    let cluster = Cluster::start(1).await;
    let publisher = publisher(&cluster, &[]).await;
    let node = &cluster.nodes[0];
    let first = publish(publisher.port, "h:s", 1).await;
    for n in 2..=6 {
        publish(publisher.port, "h:s", n).await;
    }
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=h:other")).await;
    let burst = publish_in_background(publisher.port, "h:s", 7..=30);
    client
        .send_json(json!({"type": "subscribe", "channel": "h:s", "id": 5, "since": first}))
        .await;
    let ack = client.expect_type("subscribed").await;
    assert_eq!(ack["id"], 5);
    expect_sequence(&mut client, "h:s", 2, 30).await;
    burst.await.unwrap();
    expect_quiet(&mut client, "h:s").await;
    publish(publisher.port, "h:s", 31).await;
    assert_eq!(client.until_message("h:s").await["data"]["n"], 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_epoch_or_a_restarted_redis_gets_history_gone_then_live() {
    let mut cluster = Cluster::start(1).await;
    let publisher = publisher(&cluster, &[]).await;
    let offset = publish(publisher.port, "h:g", 1).await;
    let id = offset.split_once(':').unwrap().1.to_owned();

    // Same stream id, another epoch.
    let url = cluster.nodes[0].ws_url(&format!("channels=h:g&since=h:g@zzzz9999:{id}"));
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    let gone = expect_error(&mut client, "history_gone").await;
    assert_eq!(gone["channel"], "h:g");
    publish(publisher.port, "h:g", 2).await;
    assert_eq!(client.until_message("h:g").await["data"]["n"], 2);
    drop(client);

    // Redis restarts without persistence: the stream is gone, the next message starts a new
    // epoch, and the old offset cannot be resumed from.
    cluster.redis.restart();
    cluster.nodes[0].await_ready(200).await;
    let new = eventually("a publish after the restart", async || {
        let body = json!({"channel": "h:g", "data": {"n": 3}}).to_string();
        let headers = [("Content-Type", "application/json")];
        match http_request(publisher.port, "POST", "/publish", &headers, &body).await {
            Ok((200, text)) => serde_json::from_str::<Value>(&text).ok(),
            _ => None,
        }
    })
    .await;
    let new = new["offset"].as_str().unwrap().to_owned();
    assert_ne!(
        new.split_once(':').unwrap().0,
        offset.split_once(':').unwrap().0
    );
    let url = cluster.nodes[0].ws_url(&format!("channels=h:g&since=h:g@{offset}"));
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    expect_error(&mut client, "history_gone").await;
    publish(publisher.port, "h:g", 4).await;
    assert_eq!(client.until_message("h:g").await["data"]["n"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_offset_or_too_long_a_gap_gets_history_gone() {
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__HISTORY__MAX_REPLAY", "5")
        .start()
        .await;
    // Small stream nodes, so that `MAXLEN ~ 3` really trims after a few messages.
    cluster
        .redis
        .cli(&["CONFIG", "SET", "stream-node-max-entries", "2"]);
    let publisher = publisher(&cluster, &[("PUBLISHER__HISTORY__MAX_LEN", "3")]).await;
    let node = &cluster.nodes[0];

    let trimmed = publish(publisher.port, "h:t", 1).await;
    for n in 2..=10 {
        publish(publisher.port, "h:t", n).await;
    }
    let url = node.ws_url(&format!("channels=h:t&since=h:t@{trimmed}"));
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    let gone = expect_error(&mut client, "history_gone").await;
    assert_eq!(gone["channel"], "h:t");
    publish(publisher.port, "h:t", 11).await;
    assert_eq!(client.until_message("h:t").await["data"]["n"], 11);

    // More missed than `history.max_replay` on an untrimmed stream: gone, nothing replayed.
    let first = publish(publisher.port, "h:gap", 1).await;
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=h:x")).await;
    for n in 2..=7 {
        publish(publisher.port, "h:gap", n).await;
    }
    let reply = client
        .request(json!({"type": "subscribe", "channel": "h:gap", "id": "g", "since": first}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    let gone = client.frame().await;
    assert_eq!(gone["code"], "history_gone", "{gone}");
    assert_eq!(gone["id"], "g");
    publish(publisher.port, "h:gap", 8).await;
    assert_eq!(client.until_message("h:gap").await["data"]["n"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_since_values_get_errors_and_the_session_lives_on() {
    let cluster = Cluster::start(1).await;
    let publisher = publisher(&cluster, &[]).await;
    let node = &cluster.nodes[0];
    let url = node.ws_url("channels=h:m&since=garbage,h:m@nope,@e:1-0,h:m@e:1:2-3");
    let (mut client, _) = WsClient::connect_welcomed(&url).await;
    for _ in 0..4 {
        expect_error(&mut client, "bad_since").await;
    }
    for since in ["nope", "", "e:1", "a b:1-0", "e:99999999999999999999999-0"] {
        let reply = client
            .request(json!({"type": "subscribe", "channel": "h:m2", "id": 3, "since": since}))
            .await;
        assert_eq!(reply["code"], "bad_since", "since {since:?}: {reply}");
        assert_eq!(reply["id"], 3);
    }
    // Well formed but unknown (this channel has no history yet): gone, not a crash.
    let reply = client
        .request(json!({"type": "subscribe", "channel": "h:m3", "since": "e:1-0"}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    expect_error(&mut client, "history_gone").await;

    let pong = client.request(json!({"type": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
    publish(publisher.port, "h:m", 1).await;
    assert_eq!(client.until_message("h:m").await["data"]["n"], 1);
    assert!(tokio::time::timeout(TIMEOUT, node.await_ready(200))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_pubsub_connection_dies_catches_up_from_history() {
    // A fixed reconnect delay, so that messages are surely published while the node is not
    // subscribed.
    let cluster = Cluster::builder()
        .nodes(1)
        .env("GATEWAY__REDIS__BACKOFF_MIN_MS", "500")
        .env("GATEWAY__REDIS__BACKOFF_MAX_MS", "500")
        .start()
        .await;
    let publisher = publisher(&cluster, &[]).await;
    let node = &cluster.nodes[0];
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=h:n")).await;
    publish(publisher.port, "h:n", 1).await;
    expect_sequence(&mut client, "h:n", 1, 1).await;

    // The session stays open; the node's pub/sub connection is killed under it.
    cluster.redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for n in 2..=6 {
        publish(publisher.port, "h:n", n).await;
    }
    let burst = publish_in_background(publisher.port, "h:n", 7..=30);
    expect_sequence(&mut client, "h:n", 2, 30).await;
    burst.await.unwrap();
    expect_quiet(&mut client, "h:n").await;
    let reconnects = node.metrics().await.get("gateway_redis_reconnects_total");
    assert!(reconnects >= 1.0, "the pub/sub connection was not replaced");
}
