//! The deployment files (`docker-compose.yml`, `deploy/`) checked against the real programs,
//! without Docker: the compose environment goes through the programs' own configuration
//! loaders, the real `nginx` balances WebSockets over real gateway nodes with `deploy/nginx.conf`,
//! the real `prometheus` scrapes them with `deploy/prometheus.yml` and its alert rules, and the
//! Grafana dashboard's queries are checked against the metrics real nodes expose.
//!
//! nginx and Prometheus run from copies of the deployment files in which only the lines that
//! name Docker's service DNS (upstream servers, `listen`, service discovery) are rewritten to
//! loopback ports; `.ci/run` installs both (`nginx-light`, `prometheus`). Every process and
//! temp dir started here is owned by a guard that removes it on drop, and every wait is
//! bounded by `tests::TIMEOUT`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tests::Frames;

use serde_json::{json, Value};
use serde_yaml::Value as Yaml;
use tests::{
    eventually, free_port, http_get, http_request, repo_root, sse_post, system_program, Cluster,
    Metrics, PublisherNode, SseClient, SseItem, TempDir, WsClient,
};

const PUBLISHER_BIN: &str = env!("CARGO_BIN_EXE_publisher-node");

/// The publisher metrics of docs/REFERENCE.md §4 (stable names dashboards may use).
const STABLE_PUBLISHER_METRICS: [&str; 5] = [
    "publisher_ticks_total",
    "publisher_alerts_total",
    "publisher_published_total",
    "publisher_publish_errors_total",
    "publisher_leader",
];

// === files ===

fn read_repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Replace every line whose trimmed text is `old` by `new` (one line per entry, keeping the
/// indentation), asserting that `old` occurs exactly once, so a reshaped deployment file fails
/// loudly here instead of silently running unrewritten.
fn replace_line(text: &str, old: &str, new: &[String]) -> String {
    let mut found = 0;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim() == old {
            found += 1;
            let indent = &line[..line.len() - line.trim_start().len()];
            for replacement in new {
                out.push_str(indent);
                out.push_str(replacement);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(found, 1, "expected exactly one line `{old}`");
    out
}

// === processes ===

/// A child process stopped and reaped on drop; its stderr goes to a log file that failure
/// messages quote. Drop sends SIGTERM first when `terminate_first` is set (nginx: a SIGKILLed
/// master leaves its workers running), then SIGKILL if it is still there after a grace period.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    terminate_first: bool,
}

impl Process {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Process {
        let stderr = std::fs::File::create(&log).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Process {
            name: name.to_owned(),
            child,
            log,
            terminate_first: false,
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `ready` answers true. Returns false if the process exited first (e.g. it
    /// lost the race for its port); panics with its log on timeout.
    async fn await_ready(&mut self, mut ready: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + tests::TIMEOUT;
        loop {
            if self.exited().is_some() {
                return false;
            }
            if ready().await {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.terminate_first && self.exited().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            // Drop cannot await; a bounded poll for the exit.
            let deadline = Instant::now() + tests::TIMEOUT;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// === docker-compose.yml ===

fn compose() -> Yaml {
    let mut compose: Yaml = serde_yaml::from_str(&read_repo_file("docker-compose.yml"))
        .expect("docker-compose.yml parses");
    // `<<: *anchor` merge keys, as Compose applies them.
    compose
        .apply_merge()
        .expect("docker-compose.yml merge keys");
    compose
}

fn services(compose: &Yaml) -> BTreeMap<String, Yaml> {
    compose["services"]
        .as_mapping()
        .expect("services: a map")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_owned(), v.clone()))
        .collect()
}

/// Compose's interpolation with an empty host environment: `${VAR:-default}`, `${VAR-default}`,
/// `${VAR}`, `$VAR` (unset → default or empty) and `$$` (a literal `$`).
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {value:?}"));
            let expr = &r[..end];
            if let Some((_, default)) = expr.split_once(":-").or_else(|| expr.split_once('-')) {
                out.push_str(&interpolate(default));
            } else {
                assert!(
                    !expr.contains(['?', ':', '+']),
                    "unsupported interpolation ${{{expr}}} in {value:?}"
                );
            }
            rest = &r[end + 1..];
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            assert!(end > 0, "a lone $ in {value:?}: write $$");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

fn scalar(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A service's `environment`, map or list form, interpolated.
fn service_env(service: &Yaml) -> HashMap<String, String> {
    let mut env = HashMap::new();
    match &service["environment"] {
        Yaml::Null => {}
        Yaml::Mapping(map) => {
            for (k, v) in map {
                env.insert(scalar(k), interpolate(&scalar(v)));
            }
        }
        Yaml::Sequence(items) => {
            for item in items {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                env.insert(k.to_owned(), interpolate(v));
            }
        }
        other => panic!("environment must be a map or a list: {other:?}"),
    }
    env
}

fn string_list(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::Null => Vec::new(),
        Yaml::Sequence(items) => items.iter().map(scalar).collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        other => panic!("expected a list: {other:?}"),
    }
}

/// Which of our programs a service runs: the image's default command is the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    Gateway,
    Publisher,
}

fn program_of(service: &Yaml) -> Option<Program> {
    if service["build"].is_null() {
        return None;
    }
    match string_list(&service["command"]).first().map(String::as_str) {
        None | Some("gateway") => Some(Program::Gateway),
        Some("publisher") => Some(Program::Publisher),
        Some(other) => panic!("unknown program {other} for the app image"),
    }
}

fn load_gateway(env: &HashMap<String, String>) -> Result<gateway::config::Config, String> {
    gateway::config::Config::load_from_env(None, &[], Some(env.clone())).map_err(|e| e.to_string())
}

fn load_publisher(env: &HashMap<String, String>) -> Result<publisher::config::Config, String> {
    publisher::config::Config::load(None, Some(env.clone()), &[]).map_err(|e| e.to_string())
}

#[test]
fn compose_environment_loads_through_the_real_config_loaders() {
    let compose = compose();
    let mut seen = BTreeSet::new();
    for (name, service) in services(&compose) {
        let Some(program) = program_of(&service) else {
            continue;
        };
        seen.insert(name.clone());
        let env = service_env(&service);
        // A variable of the other program, or without the double underscore, would be ignored
        // silently by the loader, so it must not be there at all.
        let prefix = match program {
            Program::Gateway => "GATEWAY__",
            Program::Publisher => "PUBLISHER__",
        };
        for key in env.keys() {
            assert!(
                key == "RUST_LOG" || key.starts_with(prefix),
                "service {name}: {key} is not a {prefix} key and would be ignored"
            );
        }
        let (misspelt, field) = match program {
            Program::Gateway => {
                let config = load_gateway(&env)
                    .unwrap_or_else(|e| panic!("service {name}: the gateway rejects it: {e}"));
                assert_eq!(config.listen_addr().port(), 8080, "service {name}");
                assert_eq!(config.admin_listen_addr().port(), 9091, "service {name}");
                ("GATEWAY__LIMITS__MAX_CONECTIONS", "max_conections")
            }
            Program::Publisher => {
                let config = load_publisher(&env)
                    .unwrap_or_else(|e| panic!("service {name}: the publisher rejects it: {e}"));
                assert_eq!(config.listen.port(), 8090, "service {name}");
                ("PUBLISHER__TICK__INTERVL_MS", "intervl_ms")
            }
        };
        // The check can fail: the same environment plus one misspelt key is refused, naming it.
        let mut bad = env.clone();
        bad.insert(misspelt.to_owned(), "10".to_owned());
        let error = match program {
            Program::Gateway => load_gateway(&bad).err(),
            Program::Publisher => load_publisher(&bad).err(),
        }
        .unwrap_or_else(|| panic!("service {name}: {misspelt} was accepted"));
        assert!(
            error.contains(field),
            "service {name}: the error does not name {field}: {error}"
        );
    }
    assert_eq!(
        seen,
        BTreeSet::from(
            [
                "gateway",
                "publisher",
                // The `cluster` profile: cluster mode (redis.cluster_nodes).
                "gateway-cluster-1",
                "gateway-cluster-2",
                "publisher-cluster",
            ]
            .map(str::to_owned)
        ),
        "the app services"
    );
}

#[test]
fn compose_images_builds_ports_and_mounts_are_consistent() {
    let compose = compose();
    let services = services(&compose);
    let root = repo_root();

    // Images: pinned tags from the expected repositories; builds: the one Dockerfile, which
    // installs both programs under the names the services run.
    let expected_images = [
        ("redis", "redis:"),
        ("redis-c1", "redis:7"),
        ("redis-c2", "redis:7"),
        ("redis-c3", "redis:7"),
        ("redis-c4", "redis:7"),
        ("redis-c5", "redis:7"),
        ("redis-c6", "redis:7"),
        ("redis-cluster-init", "redis:7"),
        ("nginx", "nginx:1.27"),
        ("prometheus", "prom/prometheus:"),
        ("grafana", "grafana/grafana:"),
    ];
    for (name, service) in &services {
        let image = service["image"].as_str();
        let build = &service["build"];
        let has_build = !build.is_null();
        assert!(
            image.is_some() != has_build,
            "service {name}: exactly one of image and build"
        );
        if let Some(image) = image {
            let prefix = expected_images
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("unexpected image service {name}"))
                .1;
            assert!(image.starts_with(prefix), "service {name}: image {image}");
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "service {name}: image {image} must be pinned"
            );
        } else {
            assert_eq!(scalar(&build["context"]), ".", "service {name}: context");
            let dockerfile = scalar(&build["dockerfile"]);
            assert_eq!(dockerfile, "deploy/Dockerfile", "service {name}");
            assert!(root.join(&dockerfile).is_file());
        }
        for dependency in service["depends_on"]
            .as_mapping()
            .map(|m| m.keys().map(scalar).collect::<Vec<_>>())
            .unwrap_or_else(|| string_list(&service["depends_on"]))
        {
            assert!(
                services.contains_key(&dependency),
                "service {name} depends on unknown {dependency}"
            );
        }
    }
    let dockerfile = read_repo_file("deploy/Dockerfile");
    for binary in ["gateway", "publisher"] {
        assert!(
            dockerfile.contains(&format!(
                "COPY --from=builder /src/target/release/{binary} /usr/local/bin/{binary}"
            )),
            "the Dockerfile installs {binary}"
        );
    }
    assert!(dockerfile.contains(r#"CMD ["gateway"]"#));
    let status = Command::new(PUBLISHER_BIN)
        .args(["run", "--help"])
        .stdout(Stdio::null())
        .status()
        .expect("run publisher");
    assert!(status.success(), "`publisher run` is a real subcommand");

    // Published ports: only the three front doors (and the cluster profile's two gateways),
    // on loopback.
    let published: BTreeMap<String, Vec<String>> = services
        .iter()
        .map(|(name, s)| (name.clone(), string_list(&s["ports"])))
        .filter(|(_, ports)| !ports.is_empty())
        .collect();
    let expected: BTreeMap<String, Vec<String>> = [
        ("gateway-cluster-1", "127.0.0.1:8081:8080"),
        ("gateway-cluster-2", "127.0.0.1:8082:8080"),
        ("grafana", "127.0.0.1:3000:3000"),
        ("nginx", "127.0.0.1:8080:8080"),
        ("prometheus", "127.0.0.1:9090:9090"),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_owned(), vec![p.to_owned()]))
    .collect();
    assert_eq!(published, expected);

    // What listens on those container ports, and the ports the services find each other on.
    let nginx_conf = read_repo_file("deploy/nginx.conf");
    for line in [
        "listen 8080;",
        "server gateway:8080 resolve;",
        "server publisher:8090 resolve;",
    ] {
        assert!(
            nginx_conf.lines().any(|l| l.trim() == line),
            "nginx.conf has `{line}`"
        );
    }
    let prometheus_yml = read_repo_file("deploy/prometheus.yml");
    assert!(prometheus_yml.contains(r#"names: ["gateway"], type: A, port: 9091"#));
    assert!(prometheus_yml.contains(r#"names: ["publisher"], type: A, port: 8090"#));
    let prometheus = &services["prometheus"];
    let command = string_list(&prometheus["command"]);
    assert!(command.contains(&"--config.file=/etc/prometheus/prometheus.yml".to_owned()));
    // No --web.listen-address: Prometheus's default, 0.0.0.0:9090.
    assert!(!command
        .iter()
        .any(|c| c.starts_with("--web.listen-address")));
    let datasources = read_repo_file("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(datasources.contains("url: http://prometheus:9090"));
    for (name, port) in [
        ("gateway", "8080"),
        ("gateway", "9091"),
        ("publisher", "8090"),
    ] {
        assert!(
            string_list(&services[name]["expose"]).contains(&port.to_owned()),
            "service {name} exposes {port}"
        );
    }
    for (name, url) in [
        ("gateway", "http://127.0.0.1:8080/readyz"),
        ("publisher", "http://127.0.0.1:8090/healthz"),
    ] {
        assert!(
            string_list(&services[name]["healthcheck"]["test"]).contains(&url.to_owned()),
            "service {name} health-checks {url}"
        );
    }

    // Bind mounts: every host path exists.
    for (name, service) in &services {
        for volume in string_list(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    root.join(host).exists(),
                    "service {name} mounts missing {host}"
                );
            } else {
                assert!(
                    compose["volumes"].get(host).is_some(),
                    "service {name}: undeclared volume {host}"
                );
            }
        }
    }
}

// === nginx ===

/// The real nginx with `deploy/nginx.conf`, its upstreams and `listen` rewritten to loopback.
struct Nginx {
    port: u16,
    _process: Process,
    _dir: TempDir,
}

impl Nginx {
    async fn start(gateway_ports: &[u16], publisher_port: u16) -> Nginx {
        let nginx = system_program("nginx", "`apt-get install -y nginx-light`");
        let original = read_repo_file("deploy/nginx.conf");
        for _attempt in 0..3 {
            let dir = TempDir::new("nginx");
            let port = free_port();
            let gateways: Vec<String> = gateway_ports
                .iter()
                .map(|p| format!("server 127.0.0.1:{p};"))
                .collect();
            let conf = replace_line(&original, "server gateway:8080 resolve;", &gateways);
            let conf = replace_line(
                &conf,
                "server publisher:8090 resolve;",
                &[format!("server 127.0.0.1:{publisher_port};")],
            );
            let conf = replace_line(
                &conf,
                "listen 8080;",
                &[format!("listen 127.0.0.1:{port};")],
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let prefix = format!("{}/", dir.path().display());
            let mut command = Command::new(&nginx);
            command
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf_path)
                .args(["-e", "stderr", "-g"])
                .arg(format!("daemon off; pid {prefix}nginx.pid;"));
            let mut process = Process::spawn("nginx", command, dir.path().join("stderr.log"));
            process.terminate_first = true;
            if process
                .await_ready(async || matches!(http_get(port, "/healthz").await, Ok((200, _))))
                .await
            {
                return Nginx {
                    port,
                    _process: process,
                    _dir: dir,
                };
            }
            let log = process.log();
            assert!(
                log.contains("Address already in use"),
                "nginx exited at start:\n{log}"
            );
        }
        panic!("nginx lost the race for a free port three times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_balances_websockets_over_two_gateways() {
    let cluster = Cluster::start(2).await;
    let publisher =
        PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let nginx = Nginx::start(&ports, publisher.port).await;

    // Round robin: ten sessions land on both nodes.
    let url = format!("ws://127.0.0.1:{}/ws?channels=alerts", nginx.port);
    let mut clients = Vec::new();
    let mut nodes = BTreeSet::new();
    for _ in 0..10 {
        let (client, welcome) = WsClient::connect_welcomed(&url).await;
        nodes.insert(welcome["node"].as_str().expect("node name").to_owned());
        clients.push(client);
    }
    assert_eq!(
        nodes,
        BTreeSet::from(["gw-1".to_owned(), "gw-2".to_owned()])
    );

    // Every session gets a message published to Redis, whichever node holds it.
    eventually("both nodes subscribed to alerts", async || {
        (cluster.redis.numsub("alerts") == 2).then_some(())
    })
    .await;
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"critical","text":"through nginx"}"#,
    ]);
    for client in &mut clients {
        let message = client.until_message("alerts").await;
        assert_eq!(message["data"]["text"], "through nginx");
    }

    // The publisher's API behind /api/ (prefix stripped), its /metrics not.
    let (status, body) = http_request(
        nginx.port,
        "POST",
        "/api/alerts",
        &[("Content-Type", "application/json")],
        r#"{"level":"warning","text":"via the api"}"#,
    )
    .await
    .expect("nginx answers");
    assert_eq!(status, 200, "{body}");
    for client in &mut clients {
        let message = client.until_message("alerts").await;
        assert_eq!(message["data"]["text"], "via the api");
    }
    let (status, _) = http_get(nginx.port, "/api/metrics").await.expect("nginx");
    assert_eq!(status, 404);
    let (status, body) = http_get(publisher.port, "/metrics")
        .await
        .expect("publisher");
    assert_eq!(status, 200);
    assert!(body.contains("publisher_alerts_total 1"), "{body}");

    // The seed page's endpoint and identity parameter.
    let seed_url = format!("ws://127.0.0.1:{}/websocket?Id=12345", nginx.port);
    let (mut seed, welcome) = WsClient::connect_welcomed(&seed_url).await;
    assert_eq!(welcome["client_id"], "12345", "{welcome}");
    eventually("user:12345 subscribed", async || {
        (cluster.redis.numsub("user:12345") == 1).then_some(())
    })
    .await;
    cluster
        .redis
        .cli(&["PUBLISH", "user:12345", r#""just for you""#]);
    assert_eq!(
        seed.until_message("user:12345").await["data"],
        "just for you"
    );

    // The demo page and the health check, through nginx.
    let (status, page) = http_get(nginx.port, "/").await.expect("nginx answers /");
    assert_eq!(status, 200);
    assert!(
        page.to_ascii_lowercase().contains("<html"),
        "the demo page: {page:.200}"
    );
    let (status, _) = http_get(nginx.port, "/healthz").await.expect("nginx");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_passes_sse_sessions_unbuffered_and_their_posts_reach_them_from_either_node() {
    let cluster = Cluster::builder()
        .nodes(2)
        .env("GATEWAY__HEARTBEAT__PING_INTERVAL_MS", "500")
        .start()
        .await;
    let publisher =
        PublisherNode::start(&cluster.redis, &[("PUBLISHER__TICK__ENABLED", "false")]).await;
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let nginx = Nginx::start(&ports, publisher.port).await;

    let mut client = SseClient::connect(nginx.port, "/sse?channels=alerts", &[]).await;
    assert_eq!(client.head.status, 200, "{:?}", client.head);
    assert_eq!(
        client.head.header("content-type"),
        Some("text/event-stream")
    );
    let welcome = client.expect_type("welcome").await;
    let session = welcome["session"].as_str().unwrap().to_owned();

    // Unbuffered: a heartbeat comment of a few bytes gets through on its own.
    let mut pinged = false;
    for _ in 0..20 {
        if client.next().await == SseItem::Comment("ping".into()) {
            pinged = true;
            break;
        }
    }
    assert!(pinged, "no `: ping` through nginx");

    // Client frames by POST through nginx land on either node (round robin); every one is
    // answered on the stream.
    let mut forwarded = 0;
    for id in 1..=6 {
        let reply = sse_post(nginx.port, &session, &json!({"type":"ping","id":id}), &[]).await;
        assert_eq!(reply.status, 202, "{reply:?}");
        if reply.body.contains(r#""forwarded":true"#) {
            forwarded += 1;
        }
    }
    assert!(forwarded > 0, "no POST reached the other node");
    let mut pongs = BTreeSet::new();
    while pongs.len() < 6 {
        let pong = client.until_type("pong").await;
        pongs.insert(pong["id"].as_u64().unwrap());
    }
    assert_eq!(pongs, (1..=6).collect());

    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"critical","text":"sse through nginx"}"#,
    ]);
    let message = client.until_message("alerts").await;
    assert_eq!(message["data"]["text"], "sse through nginx");
}

// === Prometheus ===

/// The real Prometheus with `deploy/prometheus.yml` (service discovery rewritten to static
/// loopback targets, intervals shrunk to 1 s) and the alert rules of `deploy/prometheus/`.
struct Prometheus {
    port: u16,
    _process: Process,
    _dir: TempDir,
}

impl Prometheus {
    async fn start(gateway_admin_ports: &[u16], publisher_port: u16) -> Prometheus {
        let prometheus = system_program("prometheus", "`apt-get install -y prometheus`");
        let original = read_repo_file("deploy/prometheus.yml");
        for _attempt in 0..3 {
            let dir = TempDir::new("prometheus");
            let rules = dir.path().join("prometheus");
            std::fs::create_dir_all(&rules).expect("rules dir");
            for entry in std::fs::read_dir(repo_root().join("deploy/prometheus")).expect("rules") {
                let entry = entry.expect("rules entry");
                std::fs::copy(entry.path(), rules.join(entry.file_name())).expect("copy rules");
            }
            let port = free_port();
            let targets = |ports: &[u16]| {
                let list: Vec<String> =
                    ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
                format!("static_configs: [{{ targets: [{}] }}]", list.join(", "))
            };
            let config = replace_line(
                &original,
                r#"dns_sd_configs: [{ names: ["gateway"], type: A, port: 9091, refresh_interval: 10s }]"#,
                &[targets(gateway_admin_ports)],
            );
            let config = replace_line(
                &config,
                r#"dns_sd_configs: [{ names: ["publisher"], type: A, port: 8090, refresh_interval: 10s }]"#,
                &[targets(&[publisher_port])],
            );
            let config = replace_line(
                &config,
                r#"static_configs: [{ targets: ["localhost:9090"] }]"#,
                &[targets(&[port])],
            );
            let config = replace_line(
                &config,
                "scrape_interval: 5s",
                &["scrape_interval: 1s".into()],
            );
            let config = replace_line(
                &config,
                "scrape_timeout: 4s",
                &["scrape_timeout: 1s".into()],
            );
            let config = replace_line(
                &config,
                "evaluation_interval: 5s",
                &["evaluation_interval: 1s".into()],
            );
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config).expect("write prometheus.yml");
            let mut command = Command::new(&prometheus);
            command
                .current_dir(dir.path())
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            let mut process = Process::spawn("prometheus", command, dir.path().join("stderr.log"));
            if process
                .await_ready(async || matches!(http_get(port, "/-/ready").await, Ok((200, _))))
                .await
            {
                return Prometheus {
                    port,
                    _process: process,
                    _dir: dir,
                };
            }
            let log = process.log();
            assert!(
                log.contains("address already in use"),
                "prometheus exited at start:\n{log}"
            );
        }
        panic!("prometheus lost the race for a free port three times");
    }

    /// GET an API path; returns its `data` after checking `status: success`.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path).await.expect("prometheus answers");
        assert_eq!(status, 200, "{path}: {body}");
        let value: Value = serde_json::from_str(&body).expect("prometheus answers JSON");
        assert_eq!(value["status"], "success", "{path}: {body}");
        value["data"].clone()
    }

    /// An instant query with a single-sample result: its value, or None if the result is empty.
    async fn query_scalar(&self, query: &str) -> Option<f64> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(query)))
            .await;
        let result = data["result"].as_array().expect("result list");
        let sample = result.first()?;
        sample["value"][1].as_str()?.parse().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node() {
    let cluster = Cluster::start(2).await;
    let publisher = PublisherNode::start(&cluster.redis, &[]).await;
    let admin_ports: Vec<u16> = cluster.nodes.iter().map(|n| n.admin_port).collect();
    let prometheus = Prometheus::start(&admin_ports, publisher.port).await;

    // Three sessions: two on the first node, one on the second.
    let mut clients = Vec::new();
    for node in [&cluster.nodes[0], &cluster.nodes[0], &cluster.nodes[1]] {
        let (client, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;
        clients.push(client);
    }

    // Every target of every job is up: both gateways on their admin ports, the publisher,
    // Prometheus itself.
    let mut expected: BTreeSet<(String, String)> = admin_ports
        .iter()
        .map(|p| {
            (
                "gateway".to_owned(),
                format!("http://127.0.0.1:{p}/metrics"),
            )
        })
        .collect();
    expected.insert((
        "publisher".to_owned(),
        format!("http://127.0.0.1:{}/metrics", publisher.port),
    ));
    expected.insert((
        "prometheus".to_owned(),
        format!("http://127.0.0.1:{}/metrics", prometheus.port),
    ));
    let mut last = Value::Null;
    let up = tokio::time::timeout(tests::TIMEOUT, async {
        loop {
            let data = prometheus.api("/api/v1/targets").await;
            let targets = data["activeTargets"]
                .as_array()
                .expect("activeTargets")
                .clone();
            let up: BTreeSet<(String, String)> = targets
                .iter()
                .filter(|t| t["health"] == "up")
                .map(|t| {
                    (
                        t["labels"]["job"].as_str().unwrap_or_default().to_owned(),
                        t["scrapeUrl"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            if up == expected && targets.len() == expected.len() {
                return;
            }
            last = data;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(up.is_ok(), "targets not all up: {last:#}");

    // The sum over the nodes is what the test holds open, and follows a disconnect.
    for want in [3.0, 2.0] {
        if want == 2.0 {
            drop(clients.pop());
        }
        eventually(&format!("sum(gateway_connections) == {want}"), async || {
            (prometheus.query_scalar("sum(gateway_connections)").await == Some(want)).then_some(())
        })
        .await;
    }
    assert_eq!(
        prometheus
            .query_scalar("count(up{job=\"gateway\"} == 1)")
            .await,
        Some(2.0)
    );
    eventually("publisher_leader scraped as 1", async || {
        (prometheus.query_scalar("sum(publisher_leader)").await == Some(1.0)).then_some(())
    })
    .await;

    // deploy/prometheus/*.yml was loaded, and every rule evaluates without error.
    eventually("every alert rule evaluated ok", async || {
        let data = prometheus.api("/api/v1/rules").await;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        for rule in &bad {
            assert!(
                rule["health"] != "err",
                "rule {} fails: {}",
                rule["name"],
                rule["lastError"]
            );
        }
        (!rules.is_empty() && bad.is_empty()).then_some(())
    })
    .await;
    drop(clients);
}

// === Grafana ===

/// Every query string of a dashboard: panel targets' `expr`, template variables' queries.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// Metric families named in a PromQL expression: identifiers of our prefixes followed by
/// `{`, `[`, `)`, `,`, whitespace or the end, with histogram suffixes stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) || (i > 0 && is_ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let ident = &expr[start..i];
        let quoted = start > 0 && matches!(bytes[start - 1], b'"' | b'\'');
        let next = bytes.get(i).copied();
        let follows = matches!(next, None | Some(b'{' | b'[' | b')' | b','))
            || next.is_some_and(|b| b.is_ascii_whitespace());
        if !quoted
            && follows
            && ["gateway_", "publisher_", "process_"]
                .iter()
                .any(|p| ident.starts_with(p))
        {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| ident.strip_suffix(s))
                .unwrap_or(ident);
            names.insert(family.to_owned());
        }
    }
    names
}

/// Whether `family` is exposed exactly: a series of that name, or of a histogram's
/// `_bucket`/`_sum`/`_count` (`Metrics::has` would also accept any longer name it prefixes).
fn exposes(metrics: &Metrics, family: &str) -> bool {
    metrics.series.keys().any(|key| {
        let name = key.split('{').next().unwrap_or_default();
        name == family
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family))
    })
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(gateway_delivery_latency_seconds_bucket{instance=~"$node"}[1m]))) / process_open_fds
           + label_values(gateway_connections, instance) + publisher_leader{job="gateway_x"}"#,
    );
    let expected = [
        "gateway_connections",
        "gateway_delivery_latency_seconds",
        "process_open_fds",
        "publisher_leader",
    ];
    assert_eq!(names, expected.iter().map(|s| s.to_string()).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_existing_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read_repo_file("deploy/grafana/dashboards/gateway.json"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    // The alert rules query the same metrics; hold them to the same rule.
    let alerts: Yaml = serde_yaml::from_str(&read_repo_file("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml parses");
    for group in alerts["groups"].as_sequence().expect("rule groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            queries.push(scalar(&rule["expr"]));
        }
    }
    let names: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    for expected in [
        "gateway_connections",
        "gateway_delivery_latency_seconds",
        "publisher_leader",
        "process_resident_memory_bytes",
    ] {
        assert!(names.contains(expected), "extraction found {names:?}");
    }

    // Real nodes with some traffic behind them, so that labelled series exist.
    let cluster = Cluster::start(1).await;
    let node = &cluster.nodes[0];
    let publisher = PublisherNode::start(&cluster.redis, &[]).await;
    let (mut client, _) = WsClient::connect_welcomed(&node.ws_url("channels=alerts")).await;
    let pong = client
        .request(serde_json::json!({"type": "ping", "id": 1}))
        .await;
    assert_eq!(pong["type"], "pong");
    eventually("the node subscribed to alerts", async || {
        (cluster.redis.numsub("alerts") == 1).then_some(())
    })
    .await;
    let (status, body) = http_request(
        publisher.port,
        "POST",
        "/alerts",
        &[("Content-Type", "application/json")],
        r#"{"level":"info","text":"metrics"}"#,
    )
    .await
    .expect("publisher answers");
    assert_eq!(status, 200, "{body}");
    client.until_message("alerts").await;
    let gateway_metrics = node.metrics().await;
    let publisher_metrics = publisher.metrics().await;

    let mut missing = Vec::new();
    for name in &names {
        let found = if name.starts_with("publisher_") {
            STABLE_PUBLISHER_METRICS.contains(&name.as_str()) && exposes(&publisher_metrics, name)
        } else if name.starts_with("process_") {
            // The process panels select both jobs.
            exposes(&gateway_metrics, name) && exposes(&publisher_metrics, name)
        } else {
            exposes(&gateway_metrics, name)
        };
        if !found {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exposed by the real programs: {missing:?}"
    );
}
