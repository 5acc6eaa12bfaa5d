//! `soak`: the client side of `tests/bench/soak.sh` — hours of ordinary trouble against a
//! running cluster, checked message by message (RELIABILITY.md).
//!
//! Against two gateway nodes, two publisher replicas and a Redis with AOF that the script
//! restarts whenever it dies, it runs for `--duration` seconds: steady publishing with history
//! through the publisher's API, stable sessions, connect/disconnect churn, subscribe/
//! unsubscribe churn, slow readers that get cut off (4000), and a Redis SIGKILL every
//! `--restart-every` seconds. Every `--sample-every` seconds it records each node's RSS, open
//! descriptors, `gateway_connections`, `gateway_channels` and Redis's own subscription counts.
//!
//! It fails (exit 1) on: a message with history that a client was owed and never got, or got
//! twice or out of order; a stable session closed or told `history_gone`; a slow reader closed
//! with anything but 4000; more than 1 % of connections not welcomed; a node's RSS or
//! descriptors growing after the warm-up beyond `--rss-growth-mib` / `--fd-growth`; a gauge
//! that is not back at its baseline once the load stops.
//!
//! # Layout
//!
//! - `ledger`: what was published, and what each reader is therefore owed.
//! - `publish`: the publishing tasks (keep-alive HTTP to the publisher).
//! - `clients`: the four kinds of WebSocket clients.
//! - `sample`: readings of `/metrics` and Redis, and the Redis restarts.
//! - `report`: counters and failures.

mod clients;
mod ledger;
mod publish;
mod report;
mod sample;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use clients::Env;
use ledger::Ledger;
use report::Report;
use sample::{Restart, Sample};

#[derive(Debug, Parser, Clone)]
#[command(
    name = "soak",
    about = "Soak a running gateway cluster (see tests/bench/soak.sh)"
)]
struct Args {
    /// Gateway WebSocket URLs, comma-separated (ws://127.0.0.1:PORT/ws).
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// The gateways' admin addresses (host:port), in the same order.
    #[arg(long, value_delimiter = ',', required = true)]
    admin: Vec<String>,
    /// Publisher addresses (host:port); messages go through the first.
    #[arg(long, value_delimiter = ',', required = true)]
    publishers: Vec<String>,
    /// The Redis all of them use (restarted by SIGKILL; something must start it again).
    #[arg(long)]
    redis: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seconds between samples (default: 10 for runs under 10 minutes, else 60).
    #[arg(long)]
    sample_every: Option<u64>,
    /// Seconds between Redis restarts (0 = none; default: a third of the run, at most 120).
    #[arg(long)]
    restart_every: Option<u64>,
    /// Seconds of warm-up before growth is measured (default: a third of the run, at most 300).
    #[arg(long)]
    warmup: Option<u64>,
    /// Published channels with history (`soak:0` …).
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// Messages per second over all of them (100-byte payloads).
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Messages per second on the channel slow readers stall on.
    #[arg(long, default_value_t = 4.0)]
    fire_rate: f64,
    /// Their size: large, so that a stalled reader overflows the node's queue (and, on
    /// loopback, the several MiB the kernel buffers) within `--stall-secs`.
    #[arg(long, default_value_t = 32768)]
    fire_bytes: usize,
    #[arg(long, default_value_t = 24)]
    stable: usize,
    #[arg(long, default_value_t = 12)]
    churners: usize,
    #[arg(long, default_value_t = 4)]
    subscribers: usize,
    #[arg(long, default_value_t = 2)]
    slow: usize,
    /// How long a slow reader stalls (it should be cut off meanwhile).
    #[arg(long, default_value_t = 45)]
    stall_secs: u64,
    /// Bound on a node's RSS growth after the warm-up, in MiB.
    #[arg(long, default_value_t = 16.0)]
    rss_growth_mib: f64,
    /// Bound on a node's open-descriptor growth after the warm-up.
    #[arg(long, default_value_t = 40.0)]
    fd_growth: f64,
}

impl Args {
    fn sample_every(&self) -> u64 {
        self.sample_every
            .unwrap_or(if self.duration < 600 { 10 } else { 60 })
    }

    fn restart_every(&self) -> u64 {
        self.restart_every
            .unwrap_or((self.duration / 3).clamp(10, 120))
    }

    fn warmup(&self) -> u64 {
        self.warmup.unwrap_or((self.duration / 3).min(300))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.nodes.len() == args.admin.len(),
        "one --admin per --nodes URL"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ok = runtime.block_on(run(args))?;
    std::process::exit(if ok { 0 } else { 1 });
}

async fn wait_ready(args: &Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for addr in args.admin.iter().chain(&args.publishers) {
        while !sample::ready(addr).await {
            anyhow::ensure!(Instant::now() < deadline, "{addr} is not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<bool> {
    wait_ready(&args).await?;
    let history: Vec<String> = (0..args.channels).map(|i| format!("soak:{i}")).collect();
    let fire = "soak:fire".to_owned();
    let mut published = history.clone();
    published.push(fire.clone());
    let env = Env {
        nodes: args.nodes.clone(),
        admin: args.admin.clone(),
        ledger: Arc::new(Ledger::new(&published)),
        report: Arc::new(Report::default()),
        history: history.clone(),
        fire: fire.clone(),
        plain: (0..32).map(|i| format!("soak:plain:{i}")).collect(),
    };
    let report = env.report.clone();
    let started = report.started();
    let baseline = sample::sample(started, &args.admin, &args.publishers, &args.redis).await;
    println!("soak: baseline {}", describe(&baseline));

    // Publishing.
    let publishing = CancellationToken::new();
    let mut tasks = Vec::new();
    for channel in &history {
        tasks.push(tokio::spawn(publish::run(
            args.publishers[0].clone(),
            channel.clone(),
            args.rate / args.channels as f64,
            60,
            env.ledger.clone(),
            report.clone(),
            publishing.clone(),
        )));
    }
    tasks.push(tokio::spawn(publish::run(
        args.publishers[0].clone(),
        fire.clone(),
        args.fire_rate,
        args.fire_bytes,
        env.ledger.clone(),
        report.clone(),
        publishing.clone(),
    )));

    // Stable sessions first (all welcomed before the churn starts), then the churn.
    let finish = CancellationToken::new();
    let mut stable = Vec::new();
    for i in 0..args.stable {
        let mut channels = vec![
            history[i % history.len()].clone(),
            history[(i + 1) % history.len()].clone(),
        ];
        if i % 6 == 0 {
            channels.push("ticks".into());
        }
        // Not the large-message channel: what it carries while a node waits for Redis is more
        // than a session's queue, so its catch-up cuts every session of it off with 4000, by
        // design (RELIABILITY.md); slow readers resume it with `since` instead.
        let (tx, rx) = tokio::sync::oneshot::channel();
        stable.push(tokio::spawn(clients::stable(
            env.clone(),
            i,
            channels,
            tx,
            finish.clone(),
        )));
        let _ = rx.await;
    }
    let load = CancellationToken::new();
    let mut churn = Vec::new();
    for i in 0..args.churners {
        churn.push(tokio::spawn(clients::churner(env.clone(), i, load.clone())));
    }
    for i in 0..args.subscribers {
        churn.push(tokio::spawn(clients::subscriber(
            env.clone(),
            i,
            load.clone(),
        )));
    }
    let stall = Duration::from_secs(args.stall_secs);
    for i in 0..args.slow {
        churn.push(tokio::spawn(clients::slow(
            env.clone(),
            i,
            stall,
            load.clone(),
        )));
    }

    // Samples and restarts until the end of the run.
    let load_started = Instant::now();
    let end = load_started + Duration::from_secs(args.duration);
    let mut samples: Vec<Sample> = Vec::new();
    let mut restarts: Vec<Restart> = Vec::new();
    let sample_every = Duration::from_secs(args.sample_every());
    let restart_every = Duration::from_secs(args.restart_every());
    let mut next_sample = load_started + sample_every;
    let mut next_restart = (args.restart_every() > 0).then(|| load_started + restart_every);
    let probe = |publisher: String| async move {
        let mut http = publish::Http::new(&publisher);
        matches!(
            http.post("/publish", r#"{"channel":"soak:probe","data":0}"#)
                .await,
            Ok((200, _))
        )
    };
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            let s = sample::sample(started, &args.admin, &args.publishers, &args.redis).await;
            println!("soak: {}", describe(&s));
            samples.push(s);
            next_sample += sample_every;
        }
        if next_restart.is_some_and(|at| now >= at)
            && end.saturating_duration_since(now) > restart_every / 2
        {
            let publisher = args.publishers[0].clone();
            let restart = sample::restart_redis(started, &args.redis, &args.admin, async || {
                probe(publisher.clone()).await
            })
            .await?;
            println!(
                "soak: Redis restarted at {:.0} s: down {} ms, loading {} ms, then nodes ready in {} ms and the publisher in {} ms",
                restart.at_secs,
                restart.down.as_millis(),
                restart.loading.as_millis(),
                restart.nodes_ready.as_millis(),
                restart.publisher_ok.as_millis()
            );
            restarts.push(restart);
            next_restart = Some(Instant::now() + restart_every);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The last sample under load.
    let s = sample::sample(started, &args.admin, &args.publishers, &args.redis).await;
    println!("soak: {}", describe(&s));
    samples.push(s);

    // Stop: publishing, then the churn, then the stable sessions (which must have everything).
    publishing.cancel();
    for task in tasks {
        let _ = task.await;
    }
    load.cancel();
    for task in churn {
        let _ = task.await;
    }
    finish.cancel();
    for task in stable {
        let _ = task.await;
    }

    // Back to the baseline once the load is gone.
    let settled = settle(&args, &baseline, &report, started).await;
    println!("soak: after the load {}", describe(&settled));
    check_growth(&args, &samples, &report);
    let connects = report.get("connects");
    let failed = report.get("connect_failed");
    if failed * 100 > connects.max(1) {
        report.fail(format!(
            "{failed} of {} connections were not welcomed",
            connects + failed
        ));
    }
    print_report(&args, &baseline, &samples, &settled, &restarts, &report);
    let (failures, _) = report.failures();
    Ok(failures == 0)
}

/// Wait (up to 30 s) for every gauge to return to `baseline`; report those that do not.
async fn settle(args: &Args, baseline: &Sample, report: &Report, since: Instant) -> Sample {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = sample::sample(since, &args.admin, &args.publishers, &args.redis).await;
        let mut off = Vec::new();
        for (i, (b, n)) in baseline.nodes.iter().zip(&now.nodes).enumerate() {
            let (Some(b), Some(n)) = (b, n) else {
                off.push(format!("node {} does not answer", i + 1));
                continue;
            };
            for (what, base, value) in [
                ("gateway_connections", b.connections, n.connections),
                ("gateway_subscriptions", b.subscriptions, n.subscriptions),
                ("gateway_channels", b.channels, n.channels),
            ] {
                if value != base {
                    off.push(format!("node {} {what} {value} (baseline {base})", i + 1));
                }
            }
            // The node's Redis command pool may hold more connections than at the start.
            if n.fds > b.fds + 20.0 {
                off.push(format!(
                    "node {} open fds {} (baseline {})",
                    i + 1,
                    n.fds,
                    b.fds
                ));
            }
        }
        if now.redis != baseline.redis {
            off.push(format!(
                "Redis pub/sub {:?} (baseline {:?})",
                now.redis, baseline.redis
            ));
        }
        if off.is_empty() {
            return now;
        }
        if Instant::now() >= deadline {
            for what in off {
                report.fail(format!(
                    "not back at the baseline 30 s after the load: {what}"
                ));
            }
            return now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Growth after the warm-up: the median of the last third of the samples against the median
/// of the first third, per node.
fn check_growth(args: &Args, samples: &[Sample], report: &Report) {
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_secs >= args.warmup() as f64)
        .collect();
    if after.len() < 3 {
        report.fail(format!(
            "only {} samples after the warm-up: run longer",
            after.len()
        ));
        return;
    }
    let third = after.len().div_ceil(3);
    for node in 0..args.admin.len() {
        let series = |f: &dyn Fn(&sample::Process) -> f64, part: &[&Sample]| -> Option<f64> {
            let mut v: Vec<f64> = part
                .iter()
                .filter_map(|s| s.nodes[node].as_ref().map(f))
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let (first, last) = (&after[..third], &after[after.len() - third..]);
        let rss = |p: &sample::Process| p.rss_bytes / 1048576.0;
        let fds = |p: &sample::Process| p.fds;
        if let (Some(a), Some(b)) = (series(&rss, first), series(&rss, last)) {
            println!(
                "soak: node {} RSS after the warm-up {a:.1} → {b:.1} MiB",
                node + 1
            );
            if b - a > args.rss_growth_mib {
                report.fail(format!(
                    "node {} RSS grew {:.1} MiB after the warm-up (bound {} MiB)",
                    node + 1,
                    b - a,
                    args.rss_growth_mib
                ));
            }
        }
        if let (Some(a), Some(b)) = (series(&fds, first), series(&fds, last)) {
            println!(
                "soak: node {} open fds after the warm-up {a} → {b}",
                node + 1
            );
            if b - a > args.fd_growth {
                report.fail(format!(
                    "node {} open fds grew {} after the warm-up (bound {})",
                    node + 1,
                    b - a,
                    args.fd_growth
                ));
            }
        }
    }
}

fn describe(s: &Sample) -> String {
    let mut parts = vec![format!("t={:.0}s", s.at_secs)];
    for (i, n) in s.nodes.iter().enumerate() {
        parts.push(match n {
            Some(n) => format!(
                "gw-{}: rss {:.1} MiB fds {} conns {} channels {}",
                i + 1,
                n.rss_bytes / 1048576.0,
                n.fds,
                n.connections,
                n.channels
            ),
            None => format!("gw-{}: -", i + 1),
        });
    }
    parts.push(match s.redis {
        Some(r) => format!(
            "redis: {} pub/sub clients, {} subscriptions",
            r.clients, r.subscriptions
        ),
        None => "redis: down".into(),
    });
    parts.join("; ")
}

fn mib(p: &Option<sample::Process>) -> String {
    p.as_ref()
        .map_or("-".into(), |p| format!("{:.1}", p.rss_bytes / 1048576.0))
}

fn field(p: &Option<sample::Process>, f: impl Fn(&sample::Process) -> f64) -> String {
    p.as_ref().map_or("-".into(), |p| format!("{}", f(p)))
}

/// The figures, as Markdown (RELIABILITY.md quotes them).
fn print_report(
    args: &Args,
    baseline: &Sample,
    samples: &[Sample],
    settled: &Sample,
    restarts: &[Restart],
    report: &Report,
) {
    println!();
    println!(
        "## Soak: {} s, {} stable sessions, {} churners, {} subscribers, {} slow readers, {} msg/s on {} channels + {} × {} KiB/s, Redis restart every {} s",
        args.duration, args.stable, args.churners, args.subscribers, args.slow, args.rate,
        args.channels, args.fire_rate, args.fire_bytes / 1024, args.restart_every()
    );
    println!();
    let mut head = "| t (s) |".to_owned();
    let mut rule = "| ---: |".to_owned();
    for i in 1..=args.admin.len() {
        head.push_str(&format!(
            " gw-{i} RSS MiB | gw-{i} fds | gw-{i} conns | gw-{i} channels |"
        ));
        rule.push_str(" ---: | ---: | ---: | ---: |");
    }
    for i in 1..=args.publishers.len() {
        head.push_str(&format!(" pub-{i} RSS MiB | pub-{i} fds |"));
        rule.push_str(" ---: | ---: |");
    }
    head.push_str(" Redis pub/sub clients | Redis subscriptions |");
    rule.push_str(" ---: | ---: |");
    println!("{head}\n{rule}");
    let row = |label: String, s: &Sample| {
        let mut line = format!("| {label} |");
        for n in &s.nodes {
            line.push_str(&format!(
                " {} | {} | {} | {} |",
                mib(n),
                field(n, |p| p.fds),
                field(n, |p| p.connections),
                field(n, |p| p.channels)
            ));
        }
        for p in &s.publishers {
            line.push_str(&format!(" {} | {} |", mib(p), field(p, |p| p.fds)));
        }
        match s.redis {
            Some(r) => line.push_str(&format!(" {} | {} |", r.clients, r.subscriptions)),
            None => line.push_str(" down | down |"),
        }
        println!("{line}");
    };
    row("before".into(), baseline);
    for s in samples {
        row(format!("{:.0}", s.at_secs), s);
    }
    row("after".into(), settled);
    if !restarts.is_empty() {
        let ms = |f: &dyn Fn(&Restart) -> Duration| -> String {
            let mut v: Vec<u128> = restarts.iter().map(|r| f(r).as_millis()).collect();
            v.sort();
            format!("{} / {} / {}", v[0], v[v.len() / 2], v[v.len() - 1])
        };
        println!();
        println!("Redis restarts: {} (min / median / max ms)", restarts.len());
        println!(
            "- down (SIGKILL → the new Redis answers): {}",
            ms(&|r| r.down)
        );
        println!("- loading its AOF: {}", ms(&|r| r.loading));
        println!("- loaded → every node ready: {}", ms(&|r| r.nodes_ready));
        println!(
            "- loaded → the publisher accepts again: {}",
            ms(&|r| r.publisher_ok)
        );
    }
    println!();
    println!("Counters:");
    for (name, value) in report.counters() {
        println!("- {name}: {value}");
    }
    let (count, failures) = report.failures();
    println!();
    if count == 0 {
        println!("Result: PASS");
    } else {
        println!("Result: FAIL ({count} failures)");
        for f in failures {
            println!("- {f}");
        }
    }
}
