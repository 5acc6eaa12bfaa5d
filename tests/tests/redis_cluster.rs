//! Redis Cluster mode (docs/REFERENCE.md §7), against a real local cluster of 3 primaries and
//! 3 replicas: channels spread over every shard reach clients on two gateways, each channel is
//! subscribed on its own shard only, and sessions live through a primary's death.

use std::time::{Duration, Instant};
use tests::Frames;

use serde_json::json;
use tests::{run_gateway_to_exit, GatewayNode, RedisCluster, WsClient, TIMEOUT};

/// Gateways in cluster mode on `cluster`, with fast failure detection.
async fn gateways(cluster: &RedisCluster, n: usize, env: &[(&str, &str)]) -> Vec<GatewayNode> {
    let mut all: Vec<(String, String)> = vec![
        ("GATEWAY__REDIS__CLUSTER_NODES".into(), cluster.seeds()),
        ("GATEWAY__REDIS__PING_INTERVAL_MS".into(), "300".into()),
        ("GATEWAY__REDIS__TIMEOUT_MS".into(), "1000".into()),
        ("GATEWAY__REDIS__BACKOFF_MAX_MS".into(), "300".into()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = GatewayNode::start(&format!("gw-{}", i + 1), &all).await;
        node.await_ready(200).await;
        nodes.push(node);
    }
    nodes
}

/// One channel per shard (the harness's pick), names only.
fn one_channel_per_shard(cluster: &RedisCluster, stem: &str) -> Vec<String> {
    cluster
        .one_channel_per_shard(stem)
        .into_iter()
        .map(|(channel, _)| channel)
        .collect()
}

/// `PUBSUB SHARDNUMSUB channel` as one node answers it (its own subscribers only).
fn shardnumsub(node: &tests::RedisServer, channel: &str) -> u64 {
    node.cli(&["PUBSUB", "SHARDNUMSUB", channel])
        .lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// SPUBLISH through the cluster (`redis-cli -c` follows the redirect to the owner).
fn spublish(cluster: &RedisCluster, channel: &str, payload: &str) {
    cluster.any().cli(&["-c", "SPUBLISH", channel, payload]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_every_shard_reach_both_gateways_from_their_own_shard_only() {
    let cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 2, &[]).await;
    let channels = one_channel_per_shard(&cluster, "news");
    let query = format!("channels={}", channels.join(","));
    let (mut a, _) = WsClient::connect_welcomed(&nodes[0].ws_url(&query)).await;
    let (mut b, _) = WsClient::connect_welcomed(&nodes[1].ws_url(&query)).await;

    for channel in &channels {
        spublish(&cluster, channel, &json!({ "on": channel }).to_string());
        for client in [&mut a, &mut b] {
            let frame = client.until_message(channel).await;
            assert_eq!(frame["data"]["on"], channel.as_str());
        }
        // Subscribed on the channel's own shard, by both gateways, and nowhere else.
        let owner = cluster.primary_of(cluster.slot(channel));
        assert_eq!(shardnumsub(owner, channel), 2, "{channel} on its owner");
        for node in &cluster.nodes {
            if node.port != owner.port
                && node.port != cluster.replica_of(cluster.slot(channel)).port
            {
                assert_eq!(shardnumsub(node, channel), 0, "{channel} elsewhere");
            }
        }
    }
    for node in &nodes {
        let m = node.metrics().await;
        assert_eq!(m.get("gateway_redis_connected"), 1.0);
        assert_eq!(m.get("gateway_redis_shards"), 3.0);
    }

    // A client publish leaves through SPUBLISH and reaches the other gateway.
    a.subscribe("chat:cluster").await;
    b.subscribe("chat:cluster").await;
    let ack = a
        .request(json!({"type": "publish", "channel": "chat:cluster", "data": {"hi": 1}, "id": 1}))
        .await;
    assert_eq!(ack["type"], "published", "{ack}");
    assert_eq!(b.until_message("chat:cluster").await["data"]["hi"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_through_a_primary_killed_and_its_replica_promoted() {
    let mut cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 1, &[]).await;
    let channels = one_channel_per_shard(&cluster, "fo");
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={}", channels.join(","))))
            .await;
    let victim_channel = channels[0].clone();
    let victim = cluster.primary_of(cluster.slot(&victim_channel)).port;
    spublish(&cluster, &victim_channel, r#"{"n":0}"#);
    assert_eq!(client.until_message(&victim_channel).await["data"]["n"], 0);

    cluster.node_mut(victim).kill();
    let killed = Instant::now();
    // Delivery resumes within cluster-node-timeout + 2 s of Redis' own promotion (which takes
    // about node timeout + 2 s itself): keep publishing until a message arrives.
    let mut n = 0;
    let resumed = loop {
        n += 1;
        let payload = json!({ "n": n }).to_string();
        let _ = cluster
            .any()
            .cli_try(&["-c", "SPUBLISH", &victim_channel, &payload]);
        if let Some(tests::Received::Frame(frame)) =
            client.next_within(Duration::from_millis(200)).await
        {
            if frame["channel"] == victim_channel.as_str() {
                break killed.elapsed();
            }
        }
        assert!(
            killed.elapsed() < TIMEOUT * 2,
            "no delivery on {victim_channel} after the failover"
        );
    };
    let promotion_budget = RedisCluster::NODE_TIMEOUT * 2 + Duration::from_secs(4);
    assert!(
        resumed < promotion_budget + RedisCluster::NODE_TIMEOUT + Duration::from_secs(2),
        "delivery resumed only after {resumed:?}"
    );
    // The session was never closed, and the other shards' channels still deliver.
    for channel in &channels[1..] {
        spublish(&cluster, channel, r#"{"after":true}"#);
        assert_eq!(client.until_message(channel).await["data"]["after"], true);
    }
    nodes[0].await_ready(200).await;
}

#[test]
fn read_from_replica_without_a_cluster_stops_start_up_naming_the_key() {
    let (status, stderr) = run_gateway_to_exit(&[
        ("GATEWAY__REDIS__URL", "redis://127.0.0.1:6379"),
        ("GATEWAY__REDIS__READ_FROM", "replica"),
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("redis.read_from"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_from_replica_subscribes_on_replicas_and_survives_losing_one() {
    let mut cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 1, &[("GATEWAY__REDIS__READ_FROM", "replica")]).await;
    let publisher =
        tests::PublisherNode::start_on_cluster(&cluster, &[("PUBLISHER__TICK__ENABLED", "false")])
            .await;
    let channels = one_channel_per_shard(&cluster, "replicated");
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={}", channels.join(","))))
            .await;
    // Each channel is subscribed on its shard's replica, not on the primary.
    for channel in &channels {
        let slot = cluster.slot(channel);
        assert_eq!(
            shardnumsub(cluster.replica_of(slot), channel),
            1,
            "{channel} on its replica"
        );
        assert_eq!(
            shardnumsub(cluster.primary_of(slot), channel),
            0,
            "{channel} on its primary"
        );
        spublish(&cluster, channel, &json!({ "on": channel }).to_string());
        assert_eq!(
            client.until_message(channel).await["data"]["on"],
            channel.as_str()
        );
    }

    // The replica serving a history stream dies under it: the node subscribes again (on the
    // primary: the shard has no other replica) and catches up from the primary's history, so
    // every message arrives exactly once and in order.
    let channel = channels[0].clone();
    let slot = cluster.slot(&channel);
    let (primary, replica) = (cluster.primary_of(slot).port, cluster.replica_of(slot).port);
    let port = publisher.port;
    let last = 40;
    let stream = channel.clone();
    let producer = tokio::spawn(async move {
        for n in 1..=last {
            publish_through_failover(port, &stream, n).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let frame = client.until_message(&channel).await;
        seen.push(frame["data"]["n"].as_u64().unwrap());
    }
    cluster.node_mut(replica).kill();
    while *seen.last().unwrap() < last {
        let frame = match client.next_within(TIMEOUT * 2).await {
            Some(tests::Received::Frame(frame)) => frame,
            other => panic!("the stream stopped after {seen:?}: {other:?}"),
        };
        assert_ne!(frame["type"], "error", "{frame}");
        if frame["channel"] != channel.as_str() {
            continue;
        }
        seen.push(frame["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=last).collect::<Vec<_>>());
    producer.await.unwrap();
    assert_eq!(
        shardnumsub(cluster.node(primary), &channel),
        1,
        "fell back to the primary"
    );
    nodes[0].await_ready(200).await;
}

#[test]
fn redis_url_and_cluster_nodes_together_stop_start_up_naming_both() {
    let (status, stderr) = run_gateway_to_exit(&[
        ("GATEWAY__REDIS__URL", "redis://127.0.0.1:6379"),
        (
            "GATEWAY__REDIS__CLUSTER_NODES",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        ),
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("redis.url") && stderr.contains("redis.cluster_nodes"),
        "{stderr}"
    );
}

/// Move `slot` from its owner to the primary `to`, keys included, the way `redis-cli --cluster
/// reshard` does: IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE everywhere.
fn migrate_slot(cluster: &RedisCluster, slot: u16, to: u16) {
    let from = cluster.primary_of(slot).port;
    let id = |port: u16| cluster.node(port).cli(&["CLUSTER", "MYID"]);
    let (from_id, to_id) = (id(from), id(to));
    let slot_arg = slot.to_string();
    cluster
        .node(to)
        .cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]);
    cluster
        .node(from)
        .cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]);
    loop {
        let keys = cluster
            .node(from)
            .cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let to_port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
        args.extend(keys);
        cluster.node(from).cli(&args);
    }
    for node in [to, from] {
        cluster
            .node(node)
            .cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
    }
    for node in &cluster.nodes {
        if node.port != to && node.port != from {
            let _ = node.cli_try(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_channel_follows_its_slot_to_another_shard() {
    let cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 1, &[]).await;
    let channel = "migrating";
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={channel}"))).await;
    spublish(&cluster, channel, r#"{"n":1}"#);
    assert_eq!(client.until_message(channel).await["data"]["n"], 1);

    let slot = cluster.slot(channel);
    let from = cluster.primary_of(slot).port;
    let to = one_channel_per_shard(&cluster, "other")
        .iter()
        .map(|c| cluster.primary_of(cluster.slot(c)).port)
        .find(|&p| p != from)
        .expect("another primary");
    migrate_slot(&cluster, slot, to);
    assert_eq!(cluster.primary_of(slot).port, to);

    // The old owner told the node (`sunsubscribe`); it subscribes at the new owner.
    let started = Instant::now();
    tests::eventually("subscribed at the new owner", async || {
        (shardnumsub(cluster.node(to), channel) == 1).then_some(())
    })
    .await;
    assert_eq!(shardnumsub(cluster.node(from), channel), 0);
    spublish(&cluster, channel, r#"{"n":2}"#);
    assert_eq!(client.until_message(channel).await["data"]["n"], 2);
    assert!(started.elapsed() < RedisCluster::NODE_TIMEOUT + Duration::from_secs(2));
    let m = nodes[0].metrics().await;
    assert!(m.get(r#"gateway_redis_resubscribes_total{reason="moved"}"#) >= 1.0);
    nodes[0].await_ready(200).await;
}

/// `POST /publish {"channel","data":{"n":n}}`, retried while the shard has no primary (503).
async fn publish_through_failover(port: u16, channel: &str, n: u64) {
    let body = json!({"channel": channel, "data": {"n": n}}).to_string();
    let headers = [("Content-Type", "application/json")];
    let deadline = Instant::now() + TIMEOUT * 2;
    loop {
        match tests::http_request(port, "POST", "/publish", &headers, &body).await {
            Ok((200, _)) => return,
            _ => {
                assert!(Instant::now() < deadline, "publish {n} never succeeded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_a_history_stream_loses_nothing_silently() {
    let mut cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 1, &[]).await;
    let publisher =
        tests::PublisherNode::start_on_cluster(&cluster, &[("PUBLISHER__TICK__ENABLED", "false")])
            .await;
    let channel = "stream";
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={channel}"))).await;
    let victim = cluster.primary_of(cluster.slot(channel)).port;
    let port = publisher.port;
    let last = 60;
    let producer = tokio::spawn(async move {
        for n in 1..=last {
            publish_through_failover(port, channel, n).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    // Wait for the stream to flow, then kill the channel's primary under it.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let frame = client.until_message(channel).await;
        seen.push(frame["data"]["n"].as_u64().unwrap());
    }
    cluster.node_mut(victim).kill();
    // Everything that follows: strictly increasing (no duplicate, no reordering), and a gap
    // only right after a `history_gone` for the channel (a message the old primary took but
    // never replicated is lost for everyone; the client is told).
    let mut told = false;
    while *seen.last().unwrap() < last {
        let frame = match client.next_within(TIMEOUT * 2).await {
            Some(tests::Received::Frame(frame)) => frame,
            other => panic!("the stream stopped after {seen:?}: {other:?}"),
        };
        if frame["type"] == "error" && frame["channel"] == channel {
            assert_eq!(frame["code"], "history_gone", "{frame}");
            told = true;
            continue;
        }
        if frame["channel"] != channel {
            continue;
        }
        let n = frame["data"]["n"].as_u64().unwrap();
        let prev = *seen.last().unwrap();
        assert!(n > prev, "duplicate or reordered: {n} after {prev}");
        assert!(n == prev + 1 || told, "silent gap: {n} after {prev}");
        told = false;
        seen.push(n);
    }
    producer.await.unwrap();
    nodes[0].await_ready(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_in_place_keeps_the_sessions_and_the_order() {
    let mut cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 1, &[]).await;
    let publisher =
        tests::PublisherNode::start_on_cluster(&cluster, &[("PUBLISHER__TICK__ENABLED", "false")])
            .await;
    let channel = "restarted";
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={channel}"))).await;
    publish_through_failover(publisher.port, channel, 1).await;
    assert_eq!(client.until_message(channel).await["data"]["n"], 1);

    // Restarted faster than the cluster would fail it over: the same primary comes back, empty
    // (no persistence here, so the channel's history is lost with it: the client may be told
    // `history_gone`), and the node's connection to it is new; messages go on, in order.
    let owner = cluster.primary_of(cluster.slot(channel)).port;
    cluster.node_mut(owner).restart();
    cluster.await_healthy();
    for n in 2..=4 {
        publish_through_failover(publisher.port, channel, n).await;
    }
    let mut seen = vec![1];
    while *seen.last().unwrap() < 4 {
        let frame = match client.next_within(TIMEOUT).await {
            Some(tests::Received::Frame(frame)) => frame,
            other => panic!("the stream stopped after {seen:?}: {other:?}"),
        };
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "history_gone", "{frame}");
            continue;
        }
        if frame["channel"] != channel {
            continue;
        }
        let n = frame["data"]["n"].as_u64().unwrap();
        assert!(
            n > *seen.last().unwrap(),
            "duplicate or reordered: {n} after {seen:?}"
        );
        seen.push(n);
    }
    nodes[0].await_ready(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_restarted_with_its_data_loses_nothing_while_it_loads() {
    // The channel's primary restarts with its data (AOF) and takes seconds to load it (10 ms per
    // key, a Redis debug setting, and 300 keys), answering -LOADING meanwhile; its replica is
    // told not to take over, so the shard comes back as it was, history included.
    let mut cluster = RedisCluster::start_with(&[
        "--appendonly",
        "yes",
        "--key-load-delay",
        "10000",
        "--loading-process-events-interval-bytes",
        "1024",
        "--cluster-require-full-coverage",
        "no",
        "--cluster-replica-no-failover",
        "yes",
    ]);
    let nodes = gateways(&cluster, 1, &[]).await;
    let publisher =
        tests::PublisherNode::start_on_cluster(&cluster, &[("PUBLISHER__TICK__ENABLED", "false")])
            .await;
    let channel = "loading";
    let (mut client, _) =
        WsClient::connect_welcomed(&nodes[0].ws_url(&format!("channels={channel}"))).await;
    publish_through_failover(publisher.port, channel, 1).await;
    assert_eq!(client.until_message(channel).await["data"]["n"], 1);

    // Values of 1 KiB on the channel's own slot, into the AOF's base file (which the delay
    // slows down).
    let owner = cluster.primary_of(cluster.slot(channel)).port;
    let mut fill = vec!["MSET".to_owned()];
    for i in 0..300 {
        fill.extend([format!("{{{channel}}}filler:{i}"), "x".repeat(1024)]);
    }
    let node = cluster.node(owner);
    node.cli(&fill.iter().map(String::as_str).collect::<Vec<_>>());
    node.cli(&["BGREWRITEAOF"]);
    tests::eventually("the AOF rewrite", async || {
        let info = node.cli(&["INFO", "persistence"]);
        (info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0"))
            .then_some(())
    })
    .await;

    cluster.node_mut(owner).kill();
    let loading = Instant::now();
    // Returns once the node answers PING, i.e. has loaded its data; the gateway subscribed
    // again and tried to catch the channel up meanwhile.
    tokio::task::block_in_place(|| cluster.node_mut(owner).start_again());
    assert!(
        loading.elapsed() > Duration::from_secs(2),
        "the node loaded too fast to test anything"
    );
    for n in 2..=3 {
        publish_through_failover(publisher.port, channel, n).await;
    }
    // Exactly what followed, once each: "loading" was not taken for lost history.
    for n in 2..=3 {
        let frame = loop {
            match client.next_within(TIMEOUT * 2).await {
                Some(tests::Received::Frame(frame)) if frame["channel"] == channel => break frame,
                Some(tests::Received::Frame(frame)) => {
                    assert_ne!(frame["type"], "error", "{frame}")
                }
                other => panic!("no message {n}: {other:?}"),
            }
        };
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["data"]["n"], n, "{frame}");
    }
    nodes[0].await_ready(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sessions_and_their_forwarded_posts_work_on_a_cluster() {
    let cluster = RedisCluster::start();
    let nodes = gateways(&cluster, 2, &[]).await;
    let channels = one_channel_per_shard(&cluster, "sse");
    let query = format!("/sse?channels={}&client_id=sse-c", channels.join(","));
    let mut client = tests::SseClient::connect(nodes[0].port, &query, &[]).await;
    let welcome = client.expect_type("welcome").await;
    let session = welcome["session"].as_str().unwrap().to_owned();
    for channel in &channels {
        spublish(&cluster, channel, &json!({ "on": channel }).to_string());
        let frame = client.until_message(channel).await;
        assert_eq!(frame["data"]["on"], channel.as_str());
    }
    // The session's key is read on the other node (cluster command pool), and the frame goes
    // to the session's node on the control channel (a shard channel).
    for (port, forwarded) in [(nodes[1].port, true), (nodes[0].port, false)] {
        let reply = tests::sse_post(port, &session, &json!({"type":"ping","id":port}), &[]).await;
        assert_eq!(reply.status, 202, "{reply:?}");
        assert!(
            reply.body.contains(&format!(r#""forwarded":{forwarded}"#)),
            "{reply:?}"
        );
        assert_eq!(client.until_type("pong").await["id"], port);
    }
    drop(client);
    let start = Instant::now();
    loop {
        let reply = tests::sse_post(nodes[1].port, &session, &json!({"type":"ping"}), &[]).await;
        if reply.status == 404 {
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the ended session's key was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
