//! The load generator itself works: a tiny bounded run against a real cluster delivers every
//! message and reports it in its JSON output, over WebSocket and over SSE (benchmarks use the
//! same binary at scale).

use std::process::Command;

use tests::{bin_path, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_reports_every_delivery() {
    let cluster = Cluster::start(2).await;
    let urls: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("ws://127.0.0.1:{}/ws", n.port))
        .collect();
    let pids: Vec<String> = cluster.nodes.iter().map(|n| n.pid().to_string()).collect();
    for sse in [false, true] {
        let out = tokio::task::spawn_blocking({
            let (redis, urls, pids) = (cluster.redis.url(), urls.join(","), pids.join(","));
            move || {
                Command::new(bin_path("loadgen"))
                    .args(["--redis", &redis, "--url", &urls, "--pids", &pids])
                    .args([
                        "--connections",
                        "40",
                        "--channels",
                        "4",
                        "--rate",
                        "200",
                        "--duration",
                        "1",
                    ])
                    .args(["--settle", "0", "--json"])
                    .args(sse.then_some("--sse"))
                    .output()
                    .expect("run loadgen")
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "loadgen (sse: {sse}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        assert_eq!(report["connections"]["made"], 40, "sse: {sse}");
        assert_eq!(
            report["connections"]["transport"],
            if sse { "sse" } else { "ws" }
        );
        let published = report["publish"]["published"].as_u64().unwrap();
        assert!(published >= 150, "published {published} of ~200");
        // 40 connections over 4 channels: every message has 10 subscribers.
        assert_eq!(
            report["deliveries"]["expected"].as_u64().unwrap(),
            published * 10
        );
        assert_eq!(
            report["deliveries"]["received"], report["deliveries"]["expected"],
            "sse: {sse}"
        );
        assert_eq!(report["deliveries"]["lost"], 0);
        assert_eq!(report["deliveries"]["duplicates"], 0);
        assert!(report["latency_ms"]["samples"].as_u64().unwrap() >= published * 10);
        assert!(report["gateways"]["cpu_secs_total"].as_f64().unwrap() > 0.0);
    }

    // It refuses anything but loopback.
    let refused = Command::new(bin_path("loadgen"))
        .args([
            "--url",
            "ws://192.0.2.1:8080/ws",
            "--connections",
            "1",
            "--rate",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));
}
