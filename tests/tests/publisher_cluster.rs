//! The publisher on a Redis Cluster (SPEC §7): the real `publisher` program in cluster mode
//! against a real 6-node cluster (`tests::RedisCluster`), observed by sharded pub/sub
//! subscribers that `SSUBSCRIBE` on the node that owns each channel, so a message that
//! arrives was SPUBLISHed on its own shard. Channels are picked so that every shard owns one.
//!
//! Every wait is bounded by `tests::TIMEOUT`; every process dies with its owner.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tests::Frames;

use serde_json::{json, Value};
use tests::{
    assert_slots_unique_and_ordered, eventually, leader_of, publisher_command, tick_fields,
    GatewayNode, PublisherNode, RedisCluster, ShardMessage, ShardSubscriber, TempDir, WsClient,
    PUBLISHER_LEASE_MS, PUBLISHER_TICK_MS,
};

/// One shard subscriber per channel, each on the node that owns the channel's slot now.
fn subscribe_on_owners(
    cluster: &RedisCluster,
    channels: &[&str],
) -> HashMap<String, ShardSubscriber> {
    channels
        .iter()
        .map(|&channel| {
            let owner = cluster.primary_of(cluster.slot(channel));
            (
                channel.to_owned(),
                ShardSubscriber::start(owner, &[channel]),
            )
        })
        .collect()
}

/// Asserts that `message` carries an offset and that its entry is in the channel's history
/// stream on `port` (asked without `-c`: a node that does not own the slot answers MOVED).
fn assert_in_history_on(cluster: &RedisCluster, port: u16, message: &ShardMessage) {
    let offset = message
        .offset
        .as_deref()
        .unwrap_or_else(|| panic!("no offset on {message:?}"));
    let (_epoch, id) = offset.split_once(':').expect("<epoch>:<stream id>");
    let key = format!("history:{{{}}}", message.channel);
    let entries = cluster.node(port).cli(&["XRANGE", &key, id, id]);
    assert!(
        entries.contains(id) && entries.contains(&message.payload),
        "{key} on port {port} lacks {id}: {entries:?}"
    );
}

async fn post_publish(node: &PublisherNode, channel: &str, data: Value) -> (u16, Value) {
    node.post(
        "/publish",
        &json!({"channel": channel, "data": data}).to_string(),
    )
    .await
}

// === every way of publishing ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_alerts_publish_broadcast_cli_and_tail_reach_shard_subscribers_on_every_shard() {
    let cluster = RedisCluster::start();
    let shards = cluster.one_channel_per_shard("room:");
    let rooms: Vec<&str> = shards.iter().map(|(c, _)| c.as_str()).collect();
    let owner = |channel: &str| cluster.primary_of(cluster.slot(channel)).port;
    let mut everything = rooms.clone();
    everything.extend(["ticks", "alerts"]);
    let mut subs = subscribe_on_owners(&cluster, &everything);
    let node = PublisherNode::start_on_cluster(&cluster, &[]).await;
    let seeds = cluster.seeds();
    let env = [("PUBLISHER__REDIS__CLUSTER_NODES", seeds.as_str())];

    let (status, ready) = node.request("GET", "/readyz", &[], "").await;
    assert_eq!((status, ready), (200, json!({"status": "ready"})));

    // Ticks, from the lease holder, on the owner of `ticks`.
    let sub = subs.get_mut("ticks").unwrap();
    let (first, second) = (sub.next().await, sub.next().await);
    for tick in [&first, &second] {
        tick_fields(&tick.data());
        assert_in_history_on(&cluster, owner("ticks"), tick);
    }
    assert_eq!(
        tick_fields(&second.data()).1,
        tick_fields(&first.data()).1 + 1
    );

    // Alerts over HTTP and from the command line.
    let (status, body) = node
        .post(
            "/alerts",
            r#"{"level":"critical","text":"Fire in building 3"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let alert = subs.get_mut("alerts").unwrap().next().await;
    assert_eq!(alert.data(), body["alert"]);
    assert_in_history_on(&cluster, owner("alerts"), &alert);
    let (status, stdout, stderr) =
        tests::publisher_cli(&env, &["alert", "--level", "warning", "Disk", "full"]).await;
    assert!(status.success(), "{stderr}");
    let alert = subs.get_mut("alerts").unwrap().next().await;
    assert_eq!(alert.data()["text"], "Disk full");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap(),
        alert.data()
    );

    // POST /publish and `publisher publish`, one channel on each shard.
    for (i, (room, port)) in shards.iter().enumerate() {
        let (status, body) = post_publish(&node, room, json!({"n": i})).await;
        assert_eq!(status, 200, "{body}");
        let got = subs.get_mut(room.as_str()).unwrap().next().await;
        assert_eq!(got.data(), json!({"n": i}));
        assert_eq!(got.offset.as_deref(), body["offset"].as_str(), "{room}");
        assert_in_history_on(&cluster, *port, &got);

        let (status, _, stderr) =
            tests::publisher_cli(&env, &["publish", room, "from a shell"]).await;
        assert!(status.success(), "{room}: {stderr}");
        let got = subs.get_mut(room.as_str()).unwrap().next().await;
        assert_eq!(got.data(), json!("from a shell"));
        assert_in_history_on(&cluster, *port, &got);
    }

    // The shell form of the README: live only, no offset.
    for (room, _) in &shards {
        let delivered = cluster
            .any()
            .cli(&["-c", "SPUBLISH", room, r#"{"shell":1}"#]);
        assert_eq!(delivered, "1", "{room}: one subscriber, on the owner");
        let got = subs.get_mut(room.as_str()).unwrap().next().await;
        assert_eq!((got.data(), got.offset), (json!({"shell": 1}), None));
    }

    // POST /broadcast over all three shards: one message each, offsets in request order.
    let broadcast = json!({"channels": rooms, "data": "everyone"}).to_string();
    let (status, body) = node.post("/broadcast", &broadcast).await;
    assert_eq!(status, 200, "{body}");
    for (i, (room, port)) in shards.iter().enumerate() {
        let got = subs.get_mut(room.as_str()).unwrap().next().await;
        assert_eq!(got.data(), json!("everyone"));
        assert_eq!(got.offset.as_deref(), body["offsets"][i].as_str(), "{room}");
        assert_in_history_on(&cluster, *port, &got);
    }

    // Nodes that lose their script cache (a restart, a promoted replica) are caught up.
    for (_, port) in &shards {
        assert_eq!(cluster.node(*port).cli(&["SCRIPT", "FLUSH"]), "OK");
    }
    let (status, _) = node.post("/broadcast", &broadcast).await;
    assert_eq!(status, 200);
    for room in &rooms {
        let got = subs.get_mut(*room).unwrap().next().await;
        assert_eq!(
            (got.data(), got.offset.is_some()),
            (json!("everyone"), true)
        );
    }
    for (_, port) in &shards {
        let errors = cluster.node(*port).cli(&["INFO", "errorstats"]);
        assert!(
            errors.contains("errorstat_NOSCRIPT"),
            "the EVALSHA met NOSCRIPT and was sent again as EVAL: {errors}"
        );
    }
    for (room, _) in &shards {
        assert_eq!(post_publish(&node, room, json!("again")).await.0, 200);
        let got = subs.get_mut(room.as_str()).unwrap().next().await;
        assert_eq!(got.data(), json!("again"));
    }

    // `publisher tail`: a burst of lines in order, several per round trip.
    let dir = TempDir::new("cluster-tail");
    let log = dir.path().join("app.log");
    let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    std::fs::write(
        &log,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let _tail = publisher_command()
        .envs(env)
        .args([
            "tail",
            log.to_str().unwrap(),
            "--channel",
            rooms[1],
            "--from-start",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn publisher tail");
    for line in &lines {
        let got = subs.get_mut(rooms[1]).unwrap().next().await;
        assert_eq!(got.data(), json!({"line": line, "file": "app.log"}));
        assert!(got.offset.is_some());
    }

    let m = node.metrics().await;
    assert_eq!(m.get("publisher_alerts_total"), 1.0);
    assert_eq!(m.get(r#"publisher_published_total{channel="other"}"#), 12.0);
    assert_eq!(m.get("publisher_publish_errors_total"), 0.0);
}

// === end to end, through a gateway on the same cluster ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_alerts_and_history_reach_websocket_clients_through_a_gateway_on_the_cluster() {
    let cluster = RedisCluster::start();
    let gateway = GatewayNode::start(
        "gw-1",
        &[("GATEWAY__REDIS__CLUSTER_NODES".into(), cluster.seeds())],
    )
    .await;
    gateway.await_ready(200).await;
    let node = PublisherNode::start_on_cluster(&cluster, &[]).await;
    let shards = cluster.one_channel_per_shard("room:");
    let rooms: Vec<&str> = shards.iter().map(|(c, _)| c.as_str()).collect();
    let query = format!("channels=ticks,alerts,{}", rooms.join(","));
    let (mut client, _) = WsClient::connect_welcomed(&gateway.ws_url(&query)).await;

    let first = client.until_message("ticks").await;
    let second = client.until_message("ticks").await;
    assert_eq!(
        second["data"]["seq"],
        first["data"]["seq"].as_u64().unwrap() + 1
    );
    assert!(first["offset"].is_string(), "{first}");
    let (status, _) = node
        .post(
            "/alerts",
            r#"{"level":"critical","text":"Fire in building 3"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let alert = client.until_message("alerts").await;
    assert_eq!(alert["data"]["text"], "Fire in building 3");
    assert!(alert["offset"].is_string(), "{alert}");

    // On every shard: live with the offset the API answered, and what a client missed is
    // replayed from the stream on that shard when it comes back with `since`.
    for room in &rooms {
        let mut offsets = Vec::new();
        for n in 0..3 {
            let (status, body) = post_publish(&node, room, json!({"n": n})).await;
            assert_eq!(status, 200, "{body}");
            let got = client.until_message(room).await;
            assert_eq!(got["data"], json!({"n": n}));
            assert_eq!(got["offset"], body["offset"]);
            offsets.push(body["offset"].as_str().unwrap().to_owned());
        }
        let since = format!("channels={room}&since={room}@{}", offsets[0]);
        let (mut back, _) = WsClient::connect_welcomed(&gateway.ws_url(&since)).await;
        for (n, offset) in offsets.iter().enumerate().skip(1) {
            let got = back.until_message(room).await;
            assert_eq!(
                (&got["data"], got["offset"].as_str()),
                (&json!({"n": n}), Some(offset.as_str())),
                "{room}"
            );
        }
    }
}

// === the lease ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_on_a_cluster_is_replaced_within_the_lease_ttl_without_a_slot_twice() {
    let cluster = RedisCluster::start();
    let mut nodes = [
        PublisherNode::start_on_cluster(&cluster, &[]).await,
        PublisherNode::start_on_cluster(&cluster, &[]).await,
    ];
    let leader = leader_of(&[&nodes[0], &nodes[1]]).await;
    let mut sub = ShardSubscriber::start(cluster.primary_of(cluster.slot("ticks")), &["ticks"]);

    // The lease and the tick state share one slot, on that slot's primary.
    let state = cluster.primary_of(cluster.slot("{publisher}"));
    assert_eq!(state.cli(&["EXISTS", "{publisher}:leader"]), "1");
    let tick = |m: ShardMessage| {
        let (slot, seq) = tick_fields(&m.data());
        (slot, seq, m.at_ms)
    };
    let mut ticks = Vec::new();
    for _ in 0..3 {
        ticks.push(tick(sub.next().await));
    }
    assert_eq!(state.cli(&["EXISTS", "{publisher}:tick:seq"]), "1");

    let killed_at = unix_ms_now();
    nodes[leader].sigkill().await;
    let handover = loop {
        let t = tick(sub.next().await);
        ticks.push(t);
        if t.2 > killed_at && t.0 > killed_at {
            break t;
        }
    };
    let gap = handover.2 - killed_at;
    assert!(
        gap <= PUBLISHER_LEASE_MS + 2 * PUBLISHER_TICK_MS + 300,
        "ticks resumed {gap} ms after the leader died; the lease TTL is {PUBLISHER_LEASE_MS} ms"
    );
    for _ in 0..5 {
        ticks.push(tick(sub.next().await));
    }
    assert_slots_unique_and_ordered(&ticks);
    let after: Vec<_> = ticks.iter().filter(|t| t.0 >= handover.0).collect();
    for pair in after.windows(2) {
        assert_eq!(pair[1].1, pair[0].1 + 1, "seq grows by one: {ticks:?}");
    }
    assert!(nodes[1 - leader].is_leader().await);
}

// === configuration ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_url_with_cluster_nodes_or_a_bad_seed_exits_2_naming_the_keys() {
    let nodes = ("PUBLISHER__REDIS__CLUSTER_NODES", "redis://127.0.0.1:7000");
    let url = ("PUBLISHER__REDIS__URL", "redis://127.0.0.1:6379");
    for (env, args) in [
        (vec![nodes, url], vec!["run"]),
        (vec![nodes, url], vec!["publish", "room:1", "x"]),
        (
            vec![nodes],
            vec!["--redis-url", "redis://127.0.0.1:6379", "run"],
        ),
    ] {
        let (status, _, stderr) = tests::publisher_cli(&env, &args).await;
        assert_eq!(status.code(), Some(2), "{env:?} {args:?}: {stderr}");
        assert!(
            stderr.contains("`redis.url`") && stderr.contains("`redis.cluster_nodes`"),
            "{args:?} should name both keys: {stderr}"
        );
    }
    let (status, _, stderr) = tests::publisher_cli(
        &[(
            "PUBLISHER__REDIS__CLUSTER_NODES",
            "redis://:s3cret@127.0.0.1:7000,http://127.0.0.1:7001",
        )],
        &["run"],
    )
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("redis.cluster_nodes"), "{stderr}");
    assert!(
        !stderr.contains("s3cret"),
        "no password in messages: {stderr}"
    );
}

// === a shard without a primary ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_primary_down_the_other_shards_publish_and_its_channels_get_503_until_failover() {
    // Partial coverage: the live shards keep serving while one has no primary (with Redis'
    // default, every shard refuses keyed commands until the failover; see the README).
    let mut cluster = RedisCluster::start_with(&["--cluster-require-full-coverage", "no"]);
    let shards = cluster.one_channel_per_shard("room:");
    let (dead, dead_port) = shards[0].clone();
    let live = &shards[1..];
    let slot = cluster.slot(&dead);
    let replica = cluster.replica_of(slot).port;
    // The replica takes over only when the test lets it, so the outage is as long as needed.
    cluster
        .node(replica)
        .cli(&["CONFIG", "SET", "cluster-replica-no-failover", "yes"]);
    let live_rooms: Vec<&str> = live.iter().map(|(c, _)| c.as_str()).collect();
    let mut subs = subscribe_on_owners(&cluster, &live_rooms);
    // Shard channels can be subscribed on a replica; this one becomes the primary later.
    let mut dead_sub = ShardSubscriber::start(cluster.node(replica), &[&dead]);
    cluster.node_mut(dead_port).kill();

    let node =
        PublisherNode::start_on_cluster(&cluster, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let seeds = cluster.seeds();
    let env = [("PUBLISHER__REDIS__CLUSTER_NODES", seeds.as_str())];

    // The live shards publish; the dead shard's channel is refused, within the timeouts.
    for round in 0..2 {
        for (room, port) in live {
            let (status, body) = post_publish(&node, room, json!({"round": round})).await;
            assert_eq!(status, 200, "{room}: {body}");
            let got = subs.get_mut(room.as_str()).unwrap().next().await;
            assert_eq!(got.data(), json!({"round": round}));
            assert_in_history_on(&cluster, *port, &got);
        }
        let started = Instant::now();
        let (status, body) = post_publish(&node, &dead, json!({"round": round})).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("redis_unavailable")),
            "{body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answered in time"
        );
    }
    // A broadcast over all three: the live shards get it, the answer says it failed.
    let all: Vec<&str> = shards.iter().map(|(c, _)| c.as_str()).collect();
    let (status, body) = node
        .post(
            "/broadcast",
            &json!({"channels": all, "data": "partial"}).to_string(),
        )
        .await;
    assert_eq!((status, &body["error"]), (503, &json!("redis_unavailable")));
    for room in &live_rooms {
        assert_eq!(
            subs.get_mut(*room).unwrap().next().await.data(),
            json!("partial")
        );
    }
    let m = node.metrics().await;
    assert_eq!(m.get(r#"publisher_published_total{channel="other"}"#), 6.0);
    assert_eq!(m.get("publisher_publish_errors_total"), 3.0);
    // The command line likewise: a live shard works, the dead one fails (exit 1) fast.
    let (status, _, stderr) = tests::publisher_cli(&env, &["publish", live_rooms[0], "cli"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(
        subs.get_mut(live_rooms[0]).unwrap().next().await.data(),
        json!("cli")
    );
    let (status, _, stderr) = tests::publisher_cli(&env, &["publish", &dead, "cli"]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        dead_sub.drain().is_empty(),
        "nothing reached the dead shard"
    );

    // The replica takes over (as an operator makes it when automatic failover is off: with
    // the flag cleared afterwards, Redis does not start the election by itself); the channel
    // publishes again, on its new primary.
    cluster
        .node(replica)
        .cli(&["CONFIG", "SET", "cluster-replica-no-failover", "no"]);
    assert_eq!(
        cluster.node(replica).cli(&["CLUSTER", "FAILOVER", "FORCE"]),
        "OK"
    );
    eventually("the replica promoted", async || {
        (cluster.try_primary_of(slot).map(|n| n.port) == Some(replica)).then_some(())
    })
    .await;
    let body = eventually("the dead shard's channel to publish again", async || {
        let (status, body) = post_publish(&node, &dead, json!("back")).await;
        (status == 200).then_some(body)
    })
    .await;
    let got = dead_sub.next().await;
    assert_eq!(got.data(), json!("back"));
    assert_eq!(got.offset.as_deref(), body["offset"].as_str());
    assert_in_history_on(&cluster, replica, &got);
    let (status, _) = node.request("GET", "/readyz", &[], "").await;
    assert_eq!(status, 200);
}

// === the whole cluster down ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_started_while_the_cluster_is_down_is_unready_until_it_is_back() {
    let mut cluster = RedisCluster::start();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    for port in &ports {
        cluster.node_mut(*port).kill();
    }
    let node = PublisherNode::start_on_cluster(&cluster, &[]).await;
    let (status, body) = node.request("GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "{body}");
    let started = Instant::now();
    let (status, body) = post_publish(&node, "room:1", json!(1)).await;
    assert_eq!((status, &body["error"]), (503, &json!("redis_unavailable")));
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot reach Redis Cluster at redis://127.0.0.1:")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in time"
    );
    assert!(!node.is_leader().await);

    // The nodes come back with their cluster configuration (nodes.conf in their dirs).
    for port in &ports {
        cluster.node_mut(*port).restart();
    }
    cluster.await_healthy();
    eventually("/readyz 200 with the cluster back", async || {
        let (status, _) = node.request("GET", "/readyz", &[], "").await;
        (status == 200).then_some(())
    })
    .await;
    let mut sub = ShardSubscriber::start(cluster.primary_of(cluster.slot("ticks")), &["ticks"]);
    tick_fields(&sub.next().await.data());
    let mut room = ShardSubscriber::start(cluster.primary_of(cluster.slot("room:1")), &["room:1"]);
    let (status, body) = post_publish(&node, "room:1", json!("back")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(room.next().await.data(), json!("back"));
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
