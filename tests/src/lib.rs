//! The cluster test harness: real `redis-server` processes on free loopback ports, real
//! gateway processes (the `gateway-node` binary of this crate is the gateway program), a
//! WebSocket client that awaits frames with timeouts, and small HTTP and metrics helpers.
//!
//! Everything started here is owned by a value whose `Drop` kills it, so a failing test
//! still tears its cluster down.
//!
//! ```no_run
//! # async fn demo() {
//! use tests::{Cluster, Frames, WsClient};
//! let cluster = Cluster::builder().nodes(2).start().await;
//! let mut a = WsClient::connect(&cluster.nodes[0].ws_url("channels=alerts")).await;
//! a.expect_type("welcome").await;
//! cluster.redis.cli(&["PUBLISH", "alerts", "hi"]);
//! assert_eq!(a.expect_type("message").await["data"], "hi");
//! # }
//! ```

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, protocol::frame::coding::CloseCode, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use deadpool_redis::redis;

pub mod sse;
pub use sse::{sse_post, SseClient, SseItem};

/// How long any single awaited condition may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Path of one of this crate's binaries (`gateway-node`, …): next to the `deps/` folder that
/// holds the running test executable, where Cargo puts them before running integration tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("test executable directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test -p tests`",
        path.display()
    );
    path
}

/// The workspace root (deployment files are read from there).
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A system program, looked up on PATH and in the sbin directories (nginx lives in
/// /usr/sbin, which a non-root PATH may lack). Panics naming `install`, how to get it, when it
/// is missing: a test that needs a program fails without it rather than skip.
pub fn system_program(name: &str, install: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {install} (.ci/run does)"))
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Poll `check` until it returns `Some`, failing the test after `TIMEOUT` with `what`.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// === redis-server ===

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("gw-test-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// === network namespaces ===

/// A private network namespace joined to this one by a veth pair on its own /30, for faults
/// that a closed socket or `CLIENT PAUSE` cannot show: [`NetNs::partition`] takes the far end
/// of the link down, so packets are dropped silently (no RST, no error; the peer sees
/// nothing), and [`NetNs::heal`] brings it back. Needs root; removed on drop.
pub struct NetNs {
    pub name: String,
    /// This side's address and the namespace's, on the pair's /30.
    pub host_ip: String,
    pub ns_ip: String,
    host_if: String,
    ns_if: String,
}

impl NetNs {
    /// Create the namespace and its link; Err (with what `ip` said) where that is not
    /// permitted, e.g. without root.
    pub fn create() -> Result<NetNs, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 100_000;
        // 10.201.0.0/16 in /30s, picked by process and counter so parallel tests differ.
        let block = (id * 7 + n * 13) % 16_384;
        let base = block * 4;
        let ip = |host: u32| format!("10.201.{}.{}", (base + host) / 256, (base + host) % 256);
        let ns = NetNs {
            name: format!("pgt{id}n{n}"),
            host_ip: ip(1),
            ns_ip: ip(2),
            host_if: format!("pg{id}h{n}"),
            ns_if: format!("pg{id}n{n}"),
        };
        let ip_cmd = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip ({e}); install iproute2"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip_cmd(&["netns", "add", &ns.name])?;
        // From here on, drop removes whatever was made.
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip_cmd(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip_cmd(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip_cmd(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip_cmd(&["link", "set", &ns.host_if, "up"])?;
        ip_cmd(&["-n", &ns.name, "addr", "add", &ns_cidr, "dev", &ns.ns_if])?;
        ip_cmd(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"])?;
        ip_cmd(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    fn set_link(&self, inside: bool, state: &str) {
        let mut command = Command::new("ip");
        if inside {
            command.args(["-n", &self.name]);
        }
        let interface = if inside { &self.ns_if } else { &self.host_if };
        let status = command
            .args(["link", "set", interface, state])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip link set {interface} {state}");
    }

    /// Drop every packet on the link, silently for processes on this side: the far end goes
    /// down, this one merely loses its carrier (sends are dropped, nothing fails).
    pub fn partition(&self) {
        self.set_link(true, "down");
    }

    /// The same, silently for processes inside the namespace: this end goes down. (A process
    /// whose own interface is down gets errors at once instead, which is not a partition.)
    pub fn partition_inside(&self) {
        self.set_link(false, "down");
    }

    /// Both ends up again (after either kind of partition).
    pub fn heal(&self) {
        self.set_link(false, "up");
        self.set_link(true, "up");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it this one.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

// === redis ===

/// A real `redis-server` on a free port in its own temp dir, without persistence unless
/// started with [`RedisServer::start_aof`]; optionally inside a [`NetNs`], reachable from here
/// at the namespace's address, or here and also from inside one ([`RedisServer::start_for`]).
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// The namespace's name and address, when it runs in one.
    netns: Option<(String, String)>,
    /// More `redis-server` arguments (cluster mode, `appendonly yes`, another address).
    extra: Vec<String>,
    /// The host end of a [`NetNs`] link it also listens on (see [`RedisServer::url_from`]).
    also_on: Option<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// With the append-only file on (`appendonly yes`, `appendfsync everysec`, as Redis
    /// recommends): [`RedisServer::restart`] and [`RedisServer::start_again`] reload the data
    /// from the same directory. Even SIGKILL loses nothing that was acknowledged, since Redis
    /// writes the file before it replies; only a crash of the machine could lose the last
    /// second.
    pub fn start_aof() -> RedisServer {
        Self::start_with_args(&Self::AOF)
    }

    const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "everysec"];

    /// With more `redis-server` arguments (they win over the defaults above, e.g.
    /// `--key-load-delay` to make loading the data at start slow).
    pub fn start_with_args(args: &[&str]) -> RedisServer {
        Self::start_full(None, args.iter().map(|a| a.to_string()).collect())
    }

    /// Start it inside `ns`, listening on the namespace's address (and its loopback).
    pub fn start_in(ns: &NetNs) -> RedisServer {
        Self::start_with(Some((ns.name.clone(), ns.ns_ip.clone())))
    }

    /// Start it here, listening on loopback and on this end of `ns`'s link, so that processes
    /// inside `ns` reach it at [`RedisServer::url_from`] (and lose it with the link).
    pub fn start_for(ns: &NetNs) -> RedisServer {
        let mut server = Self::unstarted(None, Vec::new());
        server.also_on = Some(ns.host_ip.clone());
        server.spawn();
        server
    }

    fn start_with(netns: Option<(String, String)>) -> RedisServer {
        Self::start_full(netns, Vec::new())
    }

    fn start_full(netns: Option<(String, String)>, extra: Vec<String>) -> RedisServer {
        let mut server = Self::unstarted(netns, extra);
        // A port picked free can be taken by another test's process before redis-server binds
        // it (its own, or its cluster bus port): then it exits at once, and another pair of
        // ports is tried.
        for _attempt in 0..5 {
            server.port = free_port();
            if let Some(i) = server.extra.iter().position(|a| a == "--cluster-port") {
                server.extra[i + 1] = free_port().to_string();
            }
            if server.try_spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on five pairs of free ports");
    }

    fn unstarted(netns: Option<(String, String)>, extra: Vec<String>) -> RedisServer {
        RedisServer {
            port: free_port(),
            dir: TempDir::new("redis"),
            child: None,
            netns,
            extra,
            also_on: None,
        }
    }

    /// `program`, inside the server's namespace when it has one.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some((name, _)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name, program]);
                command
            }
        }
    }

    /// Start on `self.port`; false when the process exited at once (its port was taken).
    fn try_spawn(&mut self) -> bool {
        self.spawn_child();
        let deadline = Instant::now() + TIMEOUT;
        while self.cli_try(&["PING"]).as_deref() != Some("PONG") {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn spawn(&mut self) {
        self.spawn_child();
        let deadline = Instant::now() + TIMEOUT;
        while self.cli_try(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_child(&mut self) {
        let other = self
            .netns
            .as_ref()
            .map(|(_, ip)| ip)
            .or(self.also_on.as_ref());
        let bind = match other {
            None => "127.0.0.1".to_owned(),
            Some(ip) => format!("127.0.0.1 {ip}"),
        };
        let child = self
            .command("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", &bind])
            .args(["--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            // Later arguments win: `appendonly yes` for a server started with AOF.
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install it: `apt-get install -y redis-server redis-tools`"
                )
            });
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        let host = self.netns.as_ref().map_or("127.0.0.1", |(_, ip)| ip);
        format!("redis://{host}:{}", self.port)
    }

    /// Kill the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start it again after [`RedisServer::kill`], on the same port and directory (with AOF,
    /// with the same data); returns once it answers PING.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        self.spawn();
    }

    /// The URL a process inside `ns` uses to reach a server started with
    /// [`RedisServer::start_for`]`(ns)`.
    pub fn url_from(&self, ns: &NetNs) -> String {
        assert_eq!(
            self.also_on.as_deref(),
            Some(ns.host_ip.as_str()),
            "url_from needs a server started with RedisServer::start_for(ns)"
        );
        format!("redis://{}:{}", ns.host_ip, self.port)
    }

    /// `redis-cli ARGS` as a command to spawn (e.g. a long-running `MONITOR`), inside the
    /// server's namespace when it has one.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = self.command("redis-cli");
        command
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args);
        command
    }

    /// As [`RedisServer::cli`], None when it fails.
    pub fn cli_try(&self, args: &[&str]) -> Option<String> {
        let out = self
            .command("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}); install it: `apt-get install -y redis-tools`")
            });
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Run the real `redis-cli` against this server and return its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_try(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// `PUBSUB NUMSUB channel`: how many connections subscribe to it.
    pub fn numsub(&self, channel: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Cut the connections of `user` (see [`ClusterBuilder::redis_user`]) and refuse new
    /// ones until [`RedisServer::let_in`]: an outage for those clients alone.
    pub fn cut_off(&self, user: &str) {
        self.cli(&["ACL", "SETUSER", user, "off"]);
        self.cli(&["CLIENT", "KILL", "USER", user]);
    }

    pub fn let_in(&self, user: &str) {
        self.cli(&["ACL", "SETUSER", user, "on"]);
    }

    /// An async connection for bulk commands.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// === redis cluster ===

/// A real Redis Cluster: 3 primaries and 3 replicas, each a `redis-server` on free loopback
/// ports (its own dir and cluster bus port), joined by `redis-cli --cluster create
/// --cluster-replicas 1`, with a short `cluster-node-timeout` so failovers happen in seconds.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `cluster-node-timeout` of the test cluster.
    pub const NODE_TIMEOUT: Duration = Duration::from_millis(1500);

    pub fn start() -> RedisCluster {
        Self::start_with(&[])
    }

    /// As [`RedisCluster::start`], with more `redis-server` arguments for every node, e.g.
    /// `["--cluster-require-full-coverage", "no"]`.
    pub fn start_with(args: &[&str]) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let mut extra = vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-node-timeout".to_owned(),
                    Self::NODE_TIMEOUT.as_millis().to_string(),
                    "--cluster-port".to_owned(),
                    free_port().to_string(),
                    // A replica may take over however long it was cut off from its primary
                    // (the default refuses one that was disconnected "too long", e.g. still
                    // syncing right after the cluster was created).
                    "--cluster-replica-validity-factor".to_owned(),
                    "0".to_owned(),
                    // A replica is listed in `CLUSTER SLOTS` (where clients find replicas)
                    // only once it has a replication offset: ping it every second.
                    "--repl-ping-replica-period".to_owned(),
                    "1".to_owned(),
                ];
                extra.extend(args.iter().map(|a| a.to_string()));
                RedisServer::start_full(None, extra)
            })
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.await_healthy();
        cluster.await_replicas();
        cluster
    }

    /// Wait until every node sees three replicas and lists them in `CLUSTER SLOTS` (six node
    /// ids): `--cluster create` returns once the nodes agree on the slots, before every
    /// replica's role has reached every node and before a replica is offered to clients.
    fn await_replicas(&self) {
        let deadline = Instant::now() + TIMEOUT;
        let is_id = |line: &&str| line.len() == 40 && line.bytes().all(|b| b.is_ascii_hexdigit());
        while !self.nodes.iter().all(|n| {
            n.cli_try(&["CLUSTER", "NODES"])
                .is_some_and(|nodes| nodes.matches("slave").count() == 3)
                && n.cli_try(&["CLUSTER", "SLOTS"])
                    .is_some_and(|slots| slots.lines().filter(is_id).count() == 6)
        }) {
            assert!(
                Instant::now() < deadline,
                "the redis cluster's replicas did not attach"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until every live node says `cluster_state:ok` and knows every other, and every
    /// replica is in sync with its primary.
    pub fn await_healthy(&self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let healthy = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let clustered = n.cli_try(&["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")
                });
                let synced = n.cli_try(&["INFO", "replication"]).is_some_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                });
                clustered && synced
            });
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the redis cluster is not healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis.cluster_nodes` for a program: every node as a seed.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node that is up, for commands that do not care which.
    pub fn any(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
    }

    /// The hash slot of a key or shard channel (`CLUSTER KEYSLOT`).
    pub fn slot(&self, name: &str) -> u16 {
        self.any()
            .cli(&["CLUSTER", "KEYSLOT", name])
            .parse()
            .expect("a slot number")
    }

    /// The node that currently serves `slot` as primary, by port (from `CLUSTER SHARDS` as a
    /// live node sees it).
    pub fn primary_of(&self, slot: u16) -> &RedisServer {
        let port = self.owner_port(slot, "master");
        self.node(port)
    }

    /// The primary of `slot`, or `None` while no live primary serves it (between a primary's
    /// failure and its replica's promotion).
    pub fn try_primary_of(&self, slot: u16) -> Option<&RedisServer> {
        self.find_owner_port(slot, "master")
            .map(|port| self.node(port))
    }

    /// Channels named `<stem>0`, `<stem>1`, … picked so that each of the three primaries owns
    /// one: `[(channel, its primary's port)]`, ordered by port.
    pub fn one_channel_per_shard(&self, stem: &str) -> Vec<(String, u16)> {
        let mut picked: Vec<(String, u16)> = Vec::new();
        for i in 0..1000 {
            let channel = format!("{stem}{i}");
            let port = self.primary_of(self.slot(&channel)).port;
            if picked.iter().all(|(_, p)| *p != port) {
                picked.push((channel, port));
                if picked.len() == 3 {
                    picked.sort_by_key(|(_, port)| *port);
                    return picked;
                }
            }
        }
        panic!("no channel {stem}N on every shard")
    }

    /// A replica of the shard that serves `slot`.
    pub fn replica_of(&self, slot: u16) -> &RedisServer {
        let port = self.owner_port(slot, "slave");
        self.node(port)
    }

    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// From `CLUSTER NODES`: the port of the node with `role` (master/slave) in the shard
    /// that serves `slot`.
    fn owner_port(&self, slot: u16, role: &str) -> u16 {
        self.find_owner_port(slot, role).unwrap_or_else(|| {
            panic!(
                "no live {role} serves slot {slot}:\n{}",
                self.any().cli(&["CLUSTER", "NODES"])
            )
        })
    }

    fn find_owner_port(&self, slot: u16, role: &str) -> Option<u16> {
        let nodes = self.any().cli(&["CLUSTER", "NODES"]);
        let parse = |line: &str| -> Option<(String, u16, String, String, Vec<String>)> {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let id = fields.first()?.to_string();
            let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
            let flags = fields.get(2)?.to_string();
            let master = fields.get(3)?.to_string();
            let slots = fields.iter().skip(8).map(|s| s.to_string()).collect();
            Some((id, port, flags, master, slots))
        };
        let entries: Vec<_> = nodes.lines().filter_map(parse).collect();
        let owns = |ranges: &[String]| {
            ranges.iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>().is_ok_and(|s| s == slot),
            })
        };
        // Flags are a comma-separated set (`myself,master`, `slave,fail?`, `master,nofailover`).
        let has = |flags: &str, flag: &str| flags.split(',').any(|f| f == flag);
        let failed = |flags: &str| has(flags, "fail") || has(flags, "fail?");
        let master = entries.iter().find(|(_, _, flags, _, slots)| {
            has(flags, "master") && !failed(flags) && owns(slots)
        })?;
        if role == "master" {
            return Some(master.1);
        }
        entries
            .iter()
            .find(|(_, _, flags, of, _)| has(flags, "slave") && !failed(flags) && *of == master.0)
            .map(|entry| entry.1)
    }
}

// === shard subscribers ===

/// One message as a sharded pub/sub subscriber received it.
#[derive(Debug, Clone)]
pub struct ShardMessage {
    pub channel: String,
    /// The offset of the publisher's envelope (SPEC §5), `None` for a plain SPUBLISH.
    pub offset: Option<String>,
    /// The payload, without the envelope.
    pub payload: String,
    /// When it arrived, in Unix ms.
    pub at_ms: u64,
}

impl ShardMessage {
    /// The payload parsed as JSON.
    pub fn data(&self) -> Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("non-JSON payload on {}: {e}: {self:?}", self.channel))
    }
}

/// A sharded pub/sub subscriber on one node of a [`RedisCluster`], on its own RESP2
/// connection (redis-rs's blocking connection in a thread): `SSUBSCRIBE` on exactly the node
/// given, so a test can tell which node delivers. Its thread ends with the connection, e.g.
/// when the node is killed or the cluster is dropped.
pub struct ShardSubscriber {
    rx: tokio::sync::mpsc::UnboundedReceiver<ShardMessage>,
}

impl ShardSubscriber {
    /// Subscribed (each channel confirmed by the node) when this returns. The node must own
    /// the channels' slots, or be a replica of their owner.
    pub fn start(node: &RedisServer, channels: &[&str]) -> ShardSubscriber {
        let client = redis::Client::open(node.url()).expect("node URL");
        let mut conn = client
            .get_connection_with_timeout(TIMEOUT)
            .expect("connect to the node");
        conn.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        conn.send_packed_command(&redis::cmd("SSUBSCRIBE").arg(channels).get_packed_command())
            .expect("send SSUBSCRIBE");
        for channel in channels {
            let reply = conn.recv_response().expect("SSUBSCRIBE confirmation");
            let parts = bulk_strings(&reply);
            assert_eq!(
                parts.first().map(String::as_str),
                Some("ssubscribe"),
                "SSUBSCRIBE {channel} on port {}: {reply:?}",
                node.port
            );
        }
        // From now on it waits for messages as long as the connection lives.
        conn.set_read_timeout(None).expect("no read timeout");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            while let Ok(reply) = conn.recv_response() {
                let parts = bulk_strings(&reply);
                let [kind, channel, payload] = &parts[..] else {
                    continue;
                };
                if kind != "smessage" {
                    continue;
                }
                // The publisher's envelope: NUL, the offset, a newline, the payload.
                let (offset, payload) = match payload
                    .strip_prefix('\0')
                    .and_then(|envelope| envelope.split_once('\n'))
                {
                    Some((offset, payload)) => (Some(offset.to_owned()), payload.to_owned()),
                    None => (None, payload.clone()),
                };
                let at_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let message = ShardMessage {
                    channel: channel.clone(),
                    offset,
                    payload,
                    at_ms,
                };
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        ShardSubscriber { rx }
    }

    /// The next message, within [`TIMEOUT`].
    pub async fn next(&mut self) -> ShardMessage {
        tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("a shard message within the timeout")
            .expect("the shard subscriber's connection is open")
    }

    /// The next message on `channel`, skipping others.
    pub async fn next_on(&mut self, channel: &str) -> ShardMessage {
        loop {
            let message = self.next().await;
            if message.channel == channel {
                return message;
            }
        }
    }

    /// Whatever has arrived already, without waiting.
    pub fn drain(&mut self) -> Vec<ShardMessage> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
    }
}

/// The items of an array reply as (lossy) strings; integers in decimal.
fn bulk_strings(value: &redis::Value) -> Vec<String> {
    let items = match value {
        redis::Value::Array(items) | redis::Value::Push { data: items, .. } => items,
        _ => return Vec::new(),
    };
    items
        .iter()
        .map(|item| match item {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            redis::Value::SimpleString(text) => text.clone(),
            redis::Value::Int(n) => n.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

// === gateway nodes ===

/// A real gateway process on free ports.
pub struct GatewayNode {
    pub name: String,
    pub port: u16,
    pub admin_port: u16,
    child: Child,
}

impl GatewayNode {
    /// Start `gateway-node` with these environment variables (on top of the ports and name
    /// chosen here) and wait until `/healthz` answers.
    pub async fn start(name: &str, env: &[(String, String)]) -> GatewayNode {
        Self::start_wrapped(name, env, &[]).await
    }

    /// As [`GatewayNode::start`], run through `wrapper` (a program and its arguments that
    /// `exec`s the command after it, e.g. `["prlimit", "--nofile=512:4096", "--"]`), so that the
    /// node's pid is still the gateway's.
    pub async fn start_wrapped(
        name: &str,
        env: &[(String, String)],
        wrapper: &[&str],
    ) -> GatewayNode {
        let gateway = bin_path("gateway-node");
        for _attempt in 0..3 {
            let (port, admin_port) = (free_port(), free_port());
            let mut command = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut command = Command::new(program);
                    command.args(args).arg(&gateway);
                    command
                }
                None => Command::new(&gateway),
            };
            let child = command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env(
                    "RUST_LOG",
                    std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "error".into()),
                )
                .env("GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
                .env("GATEWAY__ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
                .env("GATEWAY__NODE_NAME", name)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn gateway-node");
            let mut node = GatewayNode {
                name: name.to_owned(),
                port,
                admin_port,
                child,
            };
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Ok(Some(_)) = node.child.try_wait() {
                    break; // Lost a port race, or bad config: try again with new ports.
                }
                // Both ports must be this node's: another test's process that won a port race
                // would answer `/healthz` too.
                if let (Ok((200, _)), Ok((200, metrics))) = (
                    http_get(node.port, "/healthz").await,
                    http_get(node.admin_port, "/metrics").await,
                ) {
                    if metrics.contains("gateway_connections")
                        && node.child.try_wait().ok().flatten().is_none()
                    {
                        return node;
                    }
                }
                assert!(Instant::now() < deadline, "gateway {name} did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("gateway {name} exited at start three times");
    }

    /// `ws://127.0.0.1:PORT/ws?QUERY`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?{query}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET on the admin port.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path)
            .await
            .expect("admin port answers")
    }

    /// The node's metrics, parsed (also checks the exposition format).
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200);
        Metrics::parse(&body)
    }

    /// Wait until `/readyz` answers `status`.
    pub async fn await_ready(&self, status: u16) {
        eventually(&format!("{} /readyz {status}", self.name), async || {
            matches!(http_get(self.admin_port, "/readyz").await, Ok((s, _)) if s == status)
                .then_some(())
        })
        .await
    }

    /// Send SIGTERM (through the real `kill` program).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Wait for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} did not exit",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kill the process at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run the gateway program to completion with this environment (for start-up failures).
pub fn run_gateway_to_exit(env: &[(&str, &str)]) -> (ExitStatus, String) {
    let out = Command::new(bin_path("gateway-node"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run gateway-node");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// === publisher processes ===

/// Tick interval and lease of test publishers: short, so failover tests run in seconds.
pub const PUBLISHER_TICK_MS: u64 = 200;
pub const PUBLISHER_LEASE_MS: u64 = 1000;

/// `publisher run` on a free port, configured through the environment like in production.
pub struct PublisherNode {
    /// The address it listens on: 127.0.0.1, or its namespace's address.
    pub host: String,
    pub port: u16,
    child: tokio::process::Child,
}

impl PublisherNode {
    /// Starts a node on `redis` with short tick and lease settings (overridable through `env`)
    /// and waits until `/healthz` answers.
    pub async fn start(redis: &RedisServer, env: &[(&str, &str)]) -> PublisherNode {
        Self::start_with(("PUBLISHER__REDIS__URL", redis.url()), None, env).await
    }

    /// As [`PublisherNode::start`], in cluster mode: every node of `cluster` is a seed
    /// (`redis.cluster_nodes`).
    pub async fn start_on_cluster(cluster: &RedisCluster, env: &[(&str, &str)]) -> PublisherNode {
        Self::start_with(
            ("PUBLISHER__REDIS__CLUSTER_NODES", cluster.seeds()),
            None,
            env,
        )
        .await
    }

    /// As [`PublisherNode::start`], inside `ns` on Redis at `redis_url` (see
    /// [`RedisServer::url_from`]), listening on the namespace's address: its API answers from
    /// here only while the link is up.
    pub async fn start_in(ns: &NetNs, redis_url: &str, env: &[(&str, &str)]) -> PublisherNode {
        Self::start_with(
            ("PUBLISHER__REDIS__URL", redis_url.to_owned()),
            Some(ns),
            env,
        )
        .await
    }

    async fn start_with(
        redis: (&str, String),
        ns: Option<&NetNs>,
        env: &[(&str, &str)],
    ) -> PublisherNode {
        let host = ns.map_or("127.0.0.1", |ns| &ns.ns_ip).to_owned();
        for _attempt in 0..3 {
            let port = free_port();
            let mut child = publisher_command_in(ns)
                .env(redis.0, &redis.1)
                .env("PUBLISHER__LISTEN", format!("{host}:{port}"))
                .env(
                    "PUBLISHER__TICK__INTERVAL_MS",
                    PUBLISHER_TICK_MS.to_string(),
                )
                .env("PUBLISHER__LEASE__TTL_MS", PUBLISHER_LEASE_MS.to_string())
                .envs(env.iter().copied())
                .arg("run")
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn publisher-node");
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // Lost a port race: try again on another port.
                }
                // The metrics name the program: another test's process that won the port race
                // would answer `/healthz` too.
                let metrics = http_request_to(&host, port, "GET", "/metrics", &[], "").await;
                if let Ok((200, body)) = metrics {
                    if body.contains("publisher_ticks_total") {
                        return PublisherNode { host, port, child };
                    }
                }
                assert!(Instant::now() < deadline, "publisher did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("publisher exited at start three times");
    }

    /// A JSON request; every answer of the API, errors included, must be JSON.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (status, text) = http_request_to(&self.host, self.port, method, path, headers, body)
            .await
            .expect("publisher answers");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} answered {status} non-JSON {text:?}: {e}"));
        (status, value)
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        self.request("POST", path, &[("Content-Type", "application/json")], body)
            .await
    }

    pub async fn metrics(&self) -> Metrics {
        let (status, body) = http_request_to(&self.host, self.port, "GET", "/metrics", &[], "")
            .await
            .expect("metrics");
        assert_eq!(status, 200);
        Metrics::parse(&body)
    }

    pub async fn is_leader(&self) -> bool {
        self.metrics().await.get("publisher_leader") == 1.0
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub async fn sigkill(&mut self) {
        self.child.start_kill().expect("kill publisher");
        self.child.wait().await.expect("reap publisher");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("publisher exits in time")
            .expect("wait for publisher")
    }
}

/// Waits until exactly one of `nodes` reports `publisher_leader 1`; returns its index.
pub async fn leader_of(nodes: &[&PublisherNode]) -> usize {
    eventually("exactly one leader", async || {
        let mut leaders = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if node.is_leader().await {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

/// A tick's `(unix_ms, seq)`, asserting its shape: only `time`, `unix_ms` and `seq`, and
/// `time` names the same instant as `unix_ms`.
pub fn tick_fields(tick: &Value) -> (u64, u64) {
    let unix_ms = tick["unix_ms"].as_u64().expect("unix_ms");
    let seq = tick["seq"].as_u64().expect("seq");
    let time = tick["time"].as_str().expect("time");
    assert_eq!(
        time,
        publisher::alert::rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms)),
        "time and unix_ms name the same instant"
    );
    assert_eq!(
        tick.as_object().unwrap().len(),
        3,
        "only time, unix_ms, seq: {tick}"
    );
    (unix_ms, seq)
}

/// Asserts what must hold for any sequence of received ticks `(unix_ms, seq, receipt time)`,
/// leader changes included: every slot at most once and in order, sequence numbers
/// increasing, slots aligned to [`PUBLISHER_TICK_MS`].
pub fn assert_slots_unique_and_ordered(ticks: &[(u64, u64, u64)]) {
    for pair in ticks.windows(2) {
        let ((slot_a, seq_a, _), (slot_b, seq_b, _)) = (pair[0], pair[1]);
        assert!(
            slot_b > slot_a,
            "slot {slot_b} after {slot_a}: a slot twice or out of order"
        );
        assert!(seq_b > seq_a, "seq {seq_b} after {seq_a}");
        assert_eq!(slot_b % PUBLISHER_TICK_MS, 0, "slots are aligned");
    }
}

/// The program with a clean environment; killed if its owner is dropped.
pub fn publisher_command() -> tokio::process::Command {
    publisher_command_in(None)
}

/// An HS256 token signed with `secret` for client `sub`, valid for an hour, with `extra`
/// claims (a JSON object, e.g. `{"channels": […]}`) merged in.
pub fn hs256_token(secret: &str, sub: &str, extra: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + 3600;
    let mut claims = serde_json::json!({"sub": sub, "exp": exp});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token")
}

/// Runs a one-shot publisher command (`publisher ARGS`) with `env` to completion, within
/// [`TIMEOUT`]: (status, stdout, stderr).
pub async fn publisher_cli(
    env: &[(&str, &str)],
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let child = publisher_command()
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn publisher-node");
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("publisher {args:?} did not finish"))
        .expect("publisher output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`publisher_command`], run inside `ns` when given (`ip netns exec` execs the program, so
/// the child's pid is still the publisher's).
fn publisher_command_in(ns: Option<&NetNs>) -> tokio::process::Command {
    let mut command = match ns {
        None => tokio::process::Command::new(bin_path("publisher-node")),
        Some(ns) => {
            let mut command = tokio::process::Command::new("ip");
            command
                .args(["netns", "exec", &ns.name])
                .arg(bin_path("publisher-node"));
            command
        }
    };
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("TEST_PUBLISHER_LOG").unwrap_or_else(|_| "error".into()),
        )
        .kill_on_drop(true);
    command
}

// === cluster ===

/// One redis-server plus N gateway nodes using it.
pub struct Cluster {
    pub redis: RedisServer,
    pub nodes: Vec<GatewayNode>,
}

#[derive(Default)]
pub struct ClusterBuilder {
    nodes: usize,
    env: Vec<(String, String)>,
    redis_user: Option<String>,
    redis_args: Vec<String>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// An environment variable for every node, e.g. `("GATEWAY__LIMITS__MAX_CONNECTIONS", "2")`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The nodes log in to Redis as `user` (password = the name), so that a test can cut
    /// them off from Redis ([`RedisServer::cut_off`]) while others go on publishing.
    pub fn redis_user(mut self, user: &str) -> Self {
        self.redis_user = Some(user.to_owned());
        self
    }

    /// Redis keeps its data across restarts ([`RedisServer::start_aof`]).
    pub fn redis_aof(self) -> Self {
        self.redis_args(&RedisServer::AOF)
    }

    /// More `redis-server` arguments (see [`RedisServer::start_with_args`]).
    pub fn redis_args(mut self, args: &[&str]) -> Self {
        self.redis_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Start redis and the nodes; returns once every node is ready (Redis connected).
    pub async fn start(self) -> Cluster {
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        let redis = RedisServer::start_with_args(&args);
        let url = match &self.redis_user {
            None => redis.url(),
            Some(user) => {
                redis.cli(&[
                    "ACL",
                    "SETUSER",
                    user,
                    "on",
                    &format!(">{user}"),
                    "+@all",
                    "~*",
                    "&*",
                ]);
                redis
                    .url()
                    .replace("redis://", &format!("redis://{user}:{user}@"))
            }
        };
        let mut env = vec![("GATEWAY__REDIS__URL".to_owned(), url)];
        env.extend(self.env);
        let mut nodes = Vec::new();
        for i in 0..self.nodes.max(1) {
            nodes.push(GatewayNode::start(&format!("gw-{}", i + 1), &env).await);
        }
        for node in &nodes {
            node.await_ready(200).await;
        }
        Cluster { redis, nodes }
    }
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub async fn start(nodes: usize) -> Cluster {
        Self::builder().nodes(nodes).start().await
    }
}

// === WebSocket client ===

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol-level test client: JSON frames in and out, every wait bounded by [`TIMEOUT`].
pub struct WsClient {
    pub ws: Socket,
    /// Whether `join`/`leave` frames (presence, on `chat:*` by default) are read like any
    /// frame; off, they are skipped: the tests of everything else use chat rooms with the
    /// default configuration and are not about who comes and goes.
    pub presence_events: bool,
}

/// What a client read instead of the frame it expected.
#[derive(Debug)]
pub enum Received {
    Frame(Value),
    Closed(Option<u16>),
}

/// What the WebSocket and SSE test clients share: a session's server frames, read one at a
/// time. Bring it into scope (`use tests::Frames;`) to call its methods on either client.
pub trait Frames: Send {
    /// The next server frame; panics when the session ends first or nothing arrives within
    /// [`TIMEOUT`].
    fn next_frame(&mut self) -> impl std::future::Future<Output = Value> + Send;

    /// The next frame, which must have this `type`.
    fn expect_type(&mut self, kind: &str) -> impl std::future::Future<Output = Value> + Send {
        async move {
            let frame = self.next_frame().await;
            assert_eq!(frame["type"], kind, "unexpected frame {frame}");
            frame
        }
    }

    /// Skip frames until one has this `type` (e.g. past ticks).
    fn until_type(&mut self, kind: &str) -> impl std::future::Future<Output = Value> + Send {
        async move {
            loop {
                let frame = self.next_frame().await;
                if frame["type"] == kind {
                    return frame;
                }
            }
        }
    }

    /// Skip frames until a `message` on `channel`.
    fn until_message(&mut self, channel: &str) -> impl std::future::Future<Output = Value> + Send {
        async move {
            loop {
                let frame = self.next_frame().await;
                if frame["type"] == "message" && frame["channel"] == channel {
                    return frame;
                }
            }
        }
    }
}

impl Frames for WsClient {
    fn next_frame(&mut self) -> impl std::future::Future<Output = Value> + Send {
        self.frame()
    }
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        Self::connect_with(url, &[]).await
    }

    /// Connect with extra request headers (`Origin`, `Authorization`, …).
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> WsClient {
        use tungstenite::client::IntoClientRequest;
        use tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().expect("ws request");
        for (k, v) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let (ws, _response) =
            tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .unwrap_or_else(|_| panic!("connect to {url} timed out"))
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        WsClient {
            ws,
            presence_events: false,
        }
    }

    /// Connect and read the welcome frame.
    pub async fn connect_welcomed(url: &str) -> (WsClient, Value) {
        let mut client = Self::connect(url).await;
        let welcome = client.expect_type("welcome").await;
        (client, welcome)
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.send(Message::text(frame.to_string())).await;
    }

    pub async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send to gateway");
    }

    /// The next text frame as JSON, or the close. Pings are answered by tungstenite.
    pub async fn next(&mut self) -> Received {
        self.next_within(TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame within {TIMEOUT:?}"))
    }

    /// The next frame, or None if nothing arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(msg) => msg,
            };
            match msg {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("gateway sent non-JSON text {text:?}: {e}"));
                    if !self.presence_events
                        && matches!(value["type"].as_str(), Some("join" | "leave"))
                    {
                        continue;
                    }
                    return Some(Received::Frame(value));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Received::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(Message::Binary(b))) => panic!("gateway sent a binary frame: {b:?}"),
                Some(Ok(_)) => continue,
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                ))
                | None => {
                    return Some(Received::Closed(None));
                }
                Some(Err(e)) => panic!("websocket error: {e}"),
            }
        }
    }

    /// The next frame, which must be a text frame.
    pub async fn frame(&mut self) -> Value {
        match self.next().await {
            Received::Frame(v) => v,
            Received::Closed(code) => panic!("expected a frame, connection closed with {code:?}"),
        }
    }

    /// Read (skipping frames) until the connection closes; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Received::Closed(code) => return code,
                Received::Frame(_) => continue,
            }
        }
    }

    /// Read (skipping text frames) until the server's close frame: its code and reason.
    pub async fn expect_close_frame(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no close frame within {TIMEOUT:?}"));
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.as_str().to_owned());
                }
                Some(Ok(Message::Close(None))) | Some(Err(_)) | None => {
                    panic!("the connection ended without a close frame")
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// A request/response round trip: send `frame`, return the next frame that is not a
    /// `message`.
    pub async fn request(&mut self, frame: Value) -> Value {
        self.send_json(frame).await;
        loop {
            let reply = self.frame().await;
            if reply["type"] != "message" {
                return reply;
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(serde_json::json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_eq!(reply["type"], "subscribed", "subscribe {channel}: {reply}");
    }
}

/// The close code as a number, for comparisons with tungstenite's enum.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

// === HTTP ===

/// A minimal HTTP/1.1 GET on 127.0.0.1:port: (status, body).
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_request(port, "GET", path, &[], "").await
}

/// A minimal HTTP/1.1 request on 127.0.0.1:port: (status, body). `Connection: close` unless
/// the caller sets `Connection`; the body is read to EOF (a 101 answer: its head only).
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let response = http_exchange(port, method, path, headers, body).await?;
    Ok((response.status, response.body))
}

/// An HTTP response with its headers (names lowercased, in order).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// As [`http_request`], with the response's headers.
pub async fn http_exchange(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    http_exchange_to("127.0.0.1", port, method, path, headers, body).await
}

/// [`http_request`] to `host:port` (e.g. a process in a [`NetNs`]).
pub async fn http_request_to(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let response = http_exchange_to(host, port, method, path, headers, body).await?;
    Ok((response.status, response.body))
}

/// [`http_exchange`] to `host:port`.
pub async fn http_exchange_to(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    let io = async {
        let mut stream = TcpStream::connect((host, port)).await?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n");
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            request.push_str("Connection: close\r\n");
        }
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
            if response_complete(&response) {
                break;
            }
        }
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(TIMEOUT, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "http timeout"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status line"))?;
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Whether a response is whole without waiting for EOF: a 101 (the connection now belongs to
/// the WebSocket) or a body of its Content-Length.
fn response_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    if head.starts_with("http/1.1 101") {
        return true;
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|len| response.len() >= end + 4 + len)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

// === metrics ===

/// A parsed Prometheus text exposition: series (name plus sorted labels, as printed) → value.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub series: HashMap<String, f64>,
}

impl Metrics {
    /// Parse, asserting the format: every sample line is `name{labels} value`, every metric has
    /// `# HELP` and `# TYPE` lines before its samples.
    pub fn parse(text: &str) -> Metrics {
        let mut series = HashMap::new();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let name = parts.next().expect("TYPE name");
                let kind = parts.next().expect("TYPE kind");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE line {line}"
                );
                typed.insert(name.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let name = key.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(
                typed.contains(family),
                "sample before its TYPE line: {line:?}"
            );
            if let Some(labels) = key.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(
                        labels.starts_with('{') && labels.ends_with('}'),
                        "bad labels in {line:?}"
                    );
                }
            }
            series.insert(key.to_owned(), value);
        }
        Metrics { series }
    }

    /// The value of a series, e.g. `gateway_connections` or
    /// `gateway_disconnects_total{reason="slow_consumer"}`; 0 when absent. Like PromQL's
    /// `sum(…)`, a key that names fewer labels than the series carry sums every series that
    /// has those labels: `gateway_connections` is the sum over `transport`, and
    /// `gateway_connections{transport="sse"}` one of them.
    pub fn get(&self, key: &str) -> f64 {
        if let Some(value) = self.series.get(key) {
            return *value;
        }
        let (name, wanted) = split_series(key);
        self.series
            .iter()
            .filter(|(k, _)| {
                let (n, labels) = split_series(k);
                n == name && wanted.iter().all(|w| labels.contains(w))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether a metric family is present.
    pub fn has(&self, name: &str) -> bool {
        self.series.keys().any(|k| {
            k == name || k.starts_with(&format!("{name}{{")) || k.starts_with(&format!("{name}_"))
        })
    }
}

/// A series key's name and its `label="value"` pairs (values never contain `,` here).
fn split_series(key: &str) -> (&str, Vec<&str>) {
    match key.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (key, Vec::new()),
    }
}

// === raw WebSocket ===

/// A WebSocket client on a bare TCP stream, for what a well-behaved library refuses to send:
/// unmasked frames, reserved bits and opcodes, oversized or fragmented messages.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrade on `path_and_query` (e.g. `/ws?channels=a`); panics unless the answer is 101.
    pub async fn connect(port: u16, path_and_query: &str) -> RawWs {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk))
                .await
                .expect("handshake timed out")
                .expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf)
        );
        let buf = buf.split_off(end + 4);
        RawWs { stream, buf }
    }

    /// A client frame, masked: `first` is the first byte (FIN, RSV1-3, opcode).
    pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        Self::frame(first, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    /// A frame with `first` as its first byte, masked with `mask` when given.
    pub fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// Write bytes as they are (a write error is ignored: the server may have closed first).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next server frame: (opcode, payload); None when the connection ends.
    pub async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((len, opcode, payload)) = parse_server_frame(&self.buf) {
                let payload = payload.to_vec();
                self.buf.drain(..len);
                return Some((opcode, payload));
            }
            let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("no frame from the gateway in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Read frames until the close; its code (None: the connection ended without one).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.next_frame().await {
            if opcode == 8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}

/// One unmasked server frame at the start of `buf`: (total length, opcode, payload). Shared
/// by the raw test client and `loadgen`.
pub fn parse_server_frame(buf: &[u8]) -> Option<(usize, u8, &[u8])> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, head) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= head + len).then(|| (head + len, opcode, &buf[head..head + len]))
}

// === history ===

/// `POST /publish {"channel","data":{"n":n}}` on the publisher at `port`; returns the offset.
pub async fn publish(port: u16, channel: &str, n: u64) -> String {
    let body = serde_json::json!({"channel": channel, "data": {"n": n}}).to_string();
    let headers = [("Content-Type", "application/json")];
    let (status, text) = http_request(port, "POST", "/publish", &headers, &body)
        .await
        .expect("publisher answers");
    assert_eq!(status, 200, "publish {n}: {text}");
    let reply: Value = serde_json::from_str(&text).expect("JSON reply");
    reply["offset"]
        .as_str()
        .unwrap_or_else(|| panic!("no offset in {reply}"))
        .to_owned()
}

/// Publish `range` in order (one request each) from a task, as a producer would meanwhile.
pub fn publish_in_background(
    port: u16,
    channel: &'static str,
    range: std::ops::RangeInclusive<u64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in range {
            publish(port, channel, n).await;
        }
    })
}

/// Read `channel`'s messages until `n == last`, asserting they are exactly `first..=last` in
/// order, each with a strictly increasing offset; returns the last offset. Frames of other
/// channels are skipped.
pub async fn expect_sequence(
    client: &mut WsClient,
    channel: &str,
    first: u64,
    last: u64,
) -> String {
    let mut offset = String::new();
    let mut prev_id: Option<(u64, u64)> = None;
    for expected in first..=last {
        let frame = client.until_message(channel).await;
        assert_eq!(
            frame["data"]["n"], expected,
            "lost, duplicated or reordered: {frame}"
        );
        offset = frame["offset"]
            .as_str()
            .unwrap_or_else(|| panic!("no offset: {frame}"))
            .to_owned();
        let id = stream_id(&offset);
        assert!(
            prev_id.is_none_or(|p| p < id),
            "offsets not increasing at {frame}"
        );
        prev_id = Some(id);
    }
    offset
}

pub fn stream_id(offset: &str) -> (u64, u64) {
    let (_, id) = offset.split_once(':').expect("epoch:id");
    let (ms, seq) = id.split_once('-').expect("ms-seq");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Nothing more arrives on `channel` for a short while (no duplicates after the sequence).
pub async fn expect_quiet(client: &mut WsClient, channel: &str) {
    while let Some(received) = client.next_within(Duration::from_millis(300)).await {
        match received {
            Received::Frame(frame) if frame["channel"] == channel => {
                panic!("unexpected frame after the sequence: {frame}")
            }
            Received::Frame(_) => {}
            Received::Closed(code) => panic!("closed with {code:?}"),
        }
    }
}

/// The next frame that is not a message: it must be an error with `code`.
pub async fn expect_error(client: &mut WsClient, code: &str) -> Value {
    let frame = client.until_type("error").await;
    assert_eq!(frame["code"], code, "{frame}");
    frame
}
