//! The demo page in a real browser: Debian's `chromium`, driven through `chromedriver` with
//! the WebDriver client `fantoccini`, against real gateway nodes and a real redis-server.
//!
//! Each test starts its own `chromedriver --port=P` (killed, with its browsers, on drop), opens
//! the page a gateway serves at `/`, and reads the page's `data-testid` elements, polling with
//! bounded waits. Screenshots go to `target/browser-artifacts/` (also on a failed wait).
//!
//! Prerequisites: `apt-get install chromium chromium-driver` (`.ci/run` installs them).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{elements::Element, wd::Capabilities, Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use tests::{free_port, http_get, Cluster, TIMEOUT};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "chromedriver";

// === chromedriver and browser sessions ===

/// A `chromedriver` process on a free port, in its own process group so that dropping it
/// also kills the browsers it started, even when a test panics before closing its sessions.
struct Chromedriver {
    port: u16,
    child: Child,
    /// Parent of the sessions' fresh `--user-data-dir`s; removed on drop.
    profiles: PathBuf,
    sessions: AtomicUsize,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        for _attempt in 0..3 {
            let port = free_port();
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start chromedriver ({e}); install it: \
                         `apt-get install -y chromium chromium-driver`"
                    )
                });
            let profiles =
                std::env::temp_dir().join(format!("gw-browser-{}-{port}", std::process::id()));
            let mut driver = Chromedriver {
                port,
                child,
                profiles,
                sessions: AtomicUsize::new(0),
            };
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Ok(Some(_)) = driver.child.try_wait() {
                    break; // Lost the port race: try again on another port.
                }
                if let Ok((200, _)) = http_get(port, "/status").await {
                    return driver;
                }
                assert!(Instant::now() < deadline, "chromedriver did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("chromedriver exited at start three times");
    }

    /// A new browser (its own Chromium process and fresh profile) in this driver.
    async fn browser(&self, label: &str) -> Browser {
        let n = self.sessions.fetch_add(1, Ordering::Relaxed);
        let profile = self.profiles.join(format!("session-{n}"));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--lang=en-US",
            "--window-size=1280,960",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let mut caps = Capabilities::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": CHROMIUM, "args": args}),
        );
        let client = tokio::time::timeout(
            TIMEOUT,
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .unwrap_or_else(|_| panic!("starting {CHROMIUM} through chromedriver timed out"))
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM} through chromedriver: {e}"));
        Browser {
            client,
            label: label.to_owned(),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profiles);
    }
}

/// One WebDriver session: a page in its own Chromium.
struct Browser {
    client: Client,
    label: String,
}

/// Everything the tests read from the page, in one WebDriver round trip.
const SNAPSHOT: &str = r#"
const q = (id) => document.querySelector(`[data-testid="${id}"]`);
const text = (id) => (q(id) ? q(id).textContent.trim() : null);
const demo = window.gatewayDemo;
return {
  state: q("state").dataset.state,
  state_text: text("state"),
  node: text("node"),
  transport: text("transport"),
  clock: text("clock"),
  clock_iso: q("clock").getAttribute("datetime"),
  seq: text("seq"),
  received: text("received"),
  alerts: [...document.querySelectorAll('[data-testid="alert-item"]')].map((li) => ({
    level: li.dataset.level,
    level_text: li.querySelector(".level")?.textContent ?? null,
    title: li.querySelector(".alert-title")?.textContent ?? null,
    text: li.querySelector("p:not(.alert-hint)")?.textContent ?? null,
    hint: li.querySelector(".alert-hint")?.textContent ?? null,
    all: li.textContent,
  })),
  chat: [...document.querySelectorAll('[data-testid="chat-item"]')].map((li) => ({
    who: li.querySelector(".who")?.textContent ?? null,
    text: li.querySelector(".text")?.textContent ?? null,
    me: li.classList.contains("me"),
  })),
  members: [...document.querySelectorAll('[data-testid="chat-member"]')].map((m) => m.textContent),
  logs: [...q("logs").querySelectorAll(".line")].map((s) => s.textContent),
  notice: text("notice"),
  // innerText: only what is shown (the hints for the other kind of bus are hidden).
  alerts_hint: q("alerts-hint")?.innerText ?? null,
  logs_hint: q("logs-hint")?.innerText ?? null,
  api: demo ? { state: demo.state(), node: demo.node(), room: demo.room(), received: demo.received() } : null,
  transitions: window.__transitions ?? [],
};
"#;

/// Records every state change of the page's client (state, close code, reconnect delay).
const RECORD_TRANSITIONS: &str = r#"
window.__transitions = [];
window.gatewayDemo.client.onState((state, info) => {
  window.__transitions.push({ state, code: info.code ?? null, delay: info.delay ?? null });
});
"#;

impl Browser {
    async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{}: open {url}: {e}", self.label));
    }

    async fn snapshot(&self) -> Value {
        self.client
            .execute(SNAPSHOT, vec![])
            .await
            .unwrap_or_else(|e| panic!("{}: read the page: {e}", self.label))
    }

    /// Poll the page until `check` accepts a snapshot. On timeout, save a screenshot and fail
    /// with the last snapshot.
    async fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let snap = self.snapshot().await;
            if let Some(v) = check(&snap) {
                return v;
            }
            if Instant::now() >= deadline {
                let name = format!("failed-{}-{}.png", self.label, slug(what));
                let shot = match self.client.screenshot().await {
                    Ok(png) => save_artifact(&name, &png).display().to_string(),
                    Err(e) => format!("no screenshot: {e}"),
                };
                panic!(
                    "{}: timed out waiting for {what} ({shot}); the page shows:\n{snap:#}",
                    self.label
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the page is connected (`state` open) to the node named `node`.
    async fn wait_open_on(&self, node: &str) -> Value {
        self.wait_for(&format!("state open on {node}"), |s| {
            (s["state"] == "open"
                && s["state_text"] == "open"
                && s["node"] == node
                && s["api"]["node"] == node)
                .then(|| s.clone())
        })
        .await
    }

    async fn testid(&self, id: &str) -> Element {
        self.client
            .find(Locator::Css(&format!(r#"[data-testid="{id}"]"#)))
            .await
            .unwrap_or_else(|e| panic!("{}: no [data-testid={id}]: {e}", self.label))
    }

    /// Replace an input's value by typing, as a user would.
    async fn fill(&self, id: &str, text: &str) {
        let input = self.testid(id).await;
        input.clear().await.expect("clear input");
        input.send_keys(text).await.expect("type into input");
    }

    async fn click(&self, id: &str) {
        self.testid(id).await.click().await.expect("click");
    }

    async fn record_transitions(&self) {
        self.client
            .execute(RECORD_TRANSITIONS, vec![])
            .await
            .expect("install the state recorder");
    }

    async fn screenshot(&self) -> Vec<u8> {
        self.client.screenshot().await.expect("screenshot")
    }
}

/// `target/browser-artifacts/`: under `CARGO_TARGET_DIR` when set to an absolute path, else
/// the target directory the test executable was built in (`target/debug/deps/browser-…`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test executable directory");
            let profile = if deps.ends_with("deps") {
                deps.parent().expect("profile directory")
            } else {
                deps
            };
            profile.parent().expect("target directory").to_path_buf()
        });
    target.join("browser-artifacts")
}

fn save_artifact(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).expect("create browser-artifacts dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write artifact");
    path
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// One browser test at a time: each runs a Chromium and a cluster, and five of them at once
/// on two cores starve each other into timeouts (a lost click, seen once), which says
/// nothing about the page.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nodes that accept pages from any origin (a page served by one node connects to another)
/// and tick on `ticks` every 500 ms, wall-clock aligned. With several nodes they share the
/// tick lease: one ticks, and another takes over within a second when it dies.
async fn cluster(nodes: usize) -> Cluster {
    Cluster::builder()
        .nodes(nodes)
        .env("GATEWAY__ORIGINS", "*")
        .env("GATEWAY__TICKS", "true")
        .env("GATEWAY__TICK_INTERVAL_MS", "500")
        .env("GATEWAY__TICK_LEASE_TTL_MS", "1000")
        .start()
        .await
}

fn page_url(port: u16, query: &str) -> String {
    format!("http://127.0.0.1:{port}/?{query}")
}

fn ws(port: u16) -> String {
    format!("ws://127.0.0.1:{port}/ws")
}

fn seq_number(snap: &Value) -> Option<u64> {
    snap["seq"].as_str()?.strip_prefix('#')?.parse().ok()
}

/// The clock's `datetime` (ISO 8601, UTC, fixed width, so strings compare as times).
fn clock_iso(snap: &Value) -> Option<String> {
    snap["clock_iso"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Wait for a clock reading later than `after` (any reading when `None`).
async fn clock_after(browser: &Browser, after: Option<&str>) -> Value {
    browser
        .wait_for("the clock to advance", |s| {
            let iso = clock_iso(s)?;
            after.is_none_or(|a| iso.as_str() > a).then(|| s.clone())
        })
        .await
}

fn alerts_titled<'a>(snap: &'a Value, title: &str) -> Vec<&'a Value> {
    snap["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["title"] == title)
        .collect()
}

// === an integrator's site ===

/// A web server of another site: answers every request with `html`, on its own port, so the
/// page's origin is not the gateway's. Stops when dropped.
struct SiteServer {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SiteServer {
    async fn start(html: String) -> SiteServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the site's port");
        let port = listener.local_addr().unwrap().port();
        let html: std::sync::Arc<str> = html.into();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let html = html.clone();
                tokio::spawn(async move {
                    // Read the request head, whatever it asks for (the page, a favicon).
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                        html.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        SiteServer { port, task }
    }
}

impl Drop for SiteServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An integrator's page, as README's "Using the client from your own page" shows it: it
/// imports `client.js` from the gateway at `127.0.0.1:<?gw=PORT>`, subscribes to `alerts`
/// and records what happens in `window.__site` (a failed import included).
const INTEGRATOR_PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>another site</title>
<script type="module">
window.__site = { imported: null, welcome: null, alerts: [] };
const gateway = "127.0.0.1:" + new URLSearchParams(location.search).get("gw");
import(`http://${gateway}/client.js`).then(({ GatewayClient }) => {
  window.__site.imported = true;
  const client = new GatewayClient([`ws://${gateway}/ws`], { channels: ["alerts"] });
  client.onWelcome((w) => { window.__site.welcome = w; });
  client.on("alerts", (data) => { window.__site.alerts.push(data); });
  client.connect();
}, (err) => { window.__site.imported = String(err); });
</script>"#;

impl Browser {
    /// Poll the integrator page's `window.__site` until `check` accepts it.
    async fn wait_for_site<T>(&self, what: &str, mut check: impl FnMut(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let site = self
                .client
                .execute("return window.__site ?? null;", vec![])
                .await
                .unwrap_or_else(|e| panic!("{}: read window.__site: {e}", self.label));
            if let Some(v) = check(&site) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}; the page has {site:#}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_connects_and_its_clock_advances() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1).await; // one node: one ticker, so `seq` is one counter
    let node = &cluster.nodes[0];
    let driver = Chromedriver::start().await;
    let browser = driver.browser("clock").await;
    browser.open(&page_url(node.port, "")).await;

    let snap = browser.wait_open_on(&node.name).await;
    assert_eq!(snap["api"]["state"], "open");
    // A node with Redis: the hints name commands that work from a checkout.
    let hint = snap["alerts_hint"].as_str().unwrap();
    assert!(
        hint.contains(r#"cargo run -p publisher -- alert --level warning "Disk 90% full""#),
        "{hint:?}"
    );
    assert!(!hint.contains("without Redis"), "{hint:?}");
    let hint = snap["logs_hint"].as_str().unwrap();
    assert!(hint.contains("cargo run -p publisher -- tail "), "{hint:?}");

    let first = clock_after(&browser, None).await;
    let (t1, seq1) = (
        clock_iso(&first).unwrap(),
        seq_number(&first).expect("tick #N"),
    );
    let text1 = first["clock"].as_str().unwrap().to_owned();
    assert!(
        text1.len() == 8 && text1.chars().filter(|&c| c == ':').count() == 2,
        "the clock shows HH:MM:SS, not {text1:?}"
    );

    // The shown time moves on (at 500 ms per tick the seconds change within two ticks), and
    // so does the tick number.
    let later = browser
        .wait_for("the clock's seconds to change", |s| {
            (s["clock"] != text1.as_str()).then(|| s.clone())
        })
        .await;
    assert!(clock_iso(&later).unwrap() > t1, "time went backwards");
    assert!(
        seq_number(&later).unwrap() > seq1,
        "tick number did not advance: {} then {}",
        first["seq"],
        later["seq"]
    );
    assert!(later["api"]["received"].as_u64().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_from_redis_cli_appears_with_its_level() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1).await;
    let node = &cluster.nodes[0];
    let driver = Chromedriver::start().await;
    let browser = driver.browser("alerts").await;
    browser.open(&page_url(node.port, "")).await;
    browser.wait_open_on(&node.name).await;

    // The welcome arrives once the connect-time subscriptions (ticks, alerts, logs) are in
    // place, so the node receives this.
    let receivers = cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"critical","title":"Fire","text":"Building 3"}"#,
    ]);
    assert_eq!(receivers, "1", "the page's node subscribes to alerts");

    let alert = browser
        .wait_for("the alert", |s| {
            alerts_titled(s, "Fire").first().cloned().cloned()
        })
        .await;
    assert_eq!(alert["level"], "critical", "data-level marker: {alert}");
    assert_eq!(alert["level_text"], "critical", "level badge: {alert}");
    assert_eq!(alert["text"], "Building 3");
    let all = alert["all"].as_str().unwrap();
    assert!(
        all.contains("Fire") && all.contains("Building 3"),
        "alert item text: {all:?}"
    );

    assert_eq!(
        alert["hint"],
        Value::Null,
        "a well-formed alert has no hint: {alert}"
    );

    // Malformed alerts are shown, marked as such with what is wrong, never as info: a plain
    // string (shown as the text), an unknown level, a missing one.
    cluster.redis.cli(&["PUBLISH", "alerts", "plain words"]);
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"fatal","text":"unknown level"}"#,
    ]);
    cluster
        .redis
        .cli(&["PUBLISH", "alerts", r#"{"text":"no level at all"}"#]);
    let find = |snap: &Value, text: &str| -> Option<Value> {
        snap["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["text"] == text)
            .cloned()
    };
    let snap = browser
        .wait_for("the malformed alerts", |s| {
            (s["alerts"].as_array()?.len() == 4).then(|| s.clone())
        })
        .await;
    for (text, badge, problem) in [
        ("plain words", "unknown", "not a JSON object"),
        ("unknown level", "fatal", "unknown level \"fatal\""),
        ("no level at all", "unknown", "no level"),
    ] {
        let a = find(&snap, text).unwrap_or_else(|| panic!("{text} is shown: {snap:#}"));
        assert_eq!(a["level"], "unknown", "{a}");
        assert_eq!(a["level_text"], badge, "{a}");
        let hint = a["hint"].as_str().unwrap_or_default();
        assert!(
            hint.contains(problem) && hint.contains("info, warning or critical"),
            "{text}: {hint:?}"
        );
    }
    // Newest first; the first alert is still there, once.
    assert_eq!(snap["alerts"][0]["text"], "no level at all");
    assert_eq!(alerts_titled(&snap, "Fire").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_message_typed_on_node_a_appears_on_node_b_with_its_author() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(2).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let driver = Chromedriver::start().await;
    let alice = driver.browser("chat-a").await;
    let bob = driver.browser("chat-b").await;
    alice.open(&page_url(a.port, "client_id=alice-tab")).await;
    bob.open(&page_url(b.port, "client_id=bob-tab")).await;
    alice.wait_open_on(&a.name).await;
    bob.wait_open_on(&b.name).await;

    // Bob joins the room (the default, "lobby") and waits for the subscription to be acked.
    bob.click("chat-join").await;
    bob.wait_for("bob in room lobby", |s| {
        (s["api"]["room"] == "lobby").then_some(())
    })
    .await;

    // Alice types her name and a message and presses Send (which joins the room first).
    alice.fill("chat-name", "Alice").await;
    alice.fill("chat-input", "Hello from node A").await;
    alice.click("chat-send").await;

    let seen_by_bob = bob
        .wait_for("alice's message on node B", |s| {
            s["chat"]
                .as_array()?
                .iter()
                .find(|m| m["text"] == "Hello from node A")
                .cloned()
        })
        .await;
    assert_eq!(seen_by_bob["who"], "Alice:", "who said it: {seen_by_bob}");
    assert_eq!(seen_by_bob["me"], false);

    let seen_by_alice = alice
        .wait_for("alice's own message", |s| {
            s["chat"]
                .as_array()?
                .iter()
                .find(|m| m["text"] == "Hello from node A")
                .cloned()
        })
        .await;
    assert_eq!(seen_by_alice["who"], "Alice:");
    assert_eq!(seen_by_alice["me"], true, "own messages are marked");
    assert_eq!(alice.snapshot().await["api"]["room"], "lobby");
    // The input was cleared for the next message.
    assert_eq!(
        alice
            .testid("chat-input")
            .await
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("")
    );

    // And back: Bob answers, Alice sees it once.
    bob.fill("chat-name", "Bob").await;
    bob.fill("chat-input", "Hi Alice, node B here").await;
    bob.click("chat-send").await;
    let reply = alice
        .wait_for("bob's reply on node A", |s| {
            s["chat"]
                .as_array()?
                .iter()
                .find(|m| m["text"] == "Hi Alice, node B here")
                .cloned()
        })
        .await;
    assert_eq!(reply["who"], "Bob:");
    let snap = alice.snapshot().await;
    assert_eq!(snap["chat"].as_array().unwrap().len(), 2, "{snap:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_in_a_chat_room_see_each_other_in_the_member_list() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(2).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let driver = Chromedriver::start().await;
    let alice = driver.browser("members-a").await;
    let bob = driver.browser("members-b").await;
    alice.open(&page_url(a.port, "client_id=alice-tab")).await;
    bob.open(&page_url(b.port, "client_id=bob-tab")).await;
    alice.wait_open_on(&a.name).await;
    bob.wait_open_on(&b.name).await;
    let members = |who: &'static [&'static str]| {
        move |s: &Value| {
            let listed: Vec<&str> = s["members"]
                .as_array()?
                .iter()
                .filter_map(|m| m.as_str())
                .collect();
            (listed == who).then_some(())
        }
    };

    // Alice joins first: she sees herself; Bob joins on the other node: both see both (the
    // list is sorted), Alice through the join event, Bob through presence.
    alice.click("chat-join").await;
    alice
        .wait_for("alice alone in the room", members(&["alice-tab"]))
        .await;
    bob.click("chat-join").await;
    bob.wait_for("bob sees both", members(&["alice-tab", "bob-tab"]))
        .await;
    alice
        .wait_for("alice sees bob join", members(&["alice-tab", "bob-tab"]))
        .await;

    // Bob leaves: Alice's list updates live.
    bob.click("chat-leave").await;
    alice
        .wait_for("alice sees bob leave", members(&["alice-tab"]))
        .await;
    bob.wait_for("bob's list is empty", members(&[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_fails_over_to_another_node_on_kill_and_on_drain() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut cluster = cluster(3).await;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let driver = Chromedriver::start().await;
    let browser = driver.browser("failover").await;
    let list = ports.iter().map(|&p| ws(p)).collect::<Vec<_>>().join(",");
    browser
        .open(&page_url(
            ports[0],
            &format!("ws={list}&client_id=failover-tab"),
        ))
        .await;
    browser.wait_open_on(&names[0]).await;
    browser.record_transitions().await;

    // Hard failure: SIGKILL node A. The page loses the connection (no close frame), backs off
    // briefly and connects to the next URL, B.
    cluster.nodes[0].kill();
    let snap = browser.wait_open_on(&names[1]).await;
    let transitions = snap["transitions"].as_array().unwrap();
    assert!(
        transitions
            .iter()
            .any(|t| t["state"] == "reconnecting" && t["code"] != 1001),
        "a lost connection, not a drain: {transitions:?}"
    );
    // It keeps working: the clock moves on (a surviving node took over the tick lease) and a
    // new alert arrives.
    let t = clock_iso(&snap).unwrap_or_default();
    clock_after(&browser, Some(&t)).await;
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"warning","title":"After kill","text":"served by B"}"#,
    ]);
    let alert = browser
        .wait_for("an alert after the kill", |s| {
            alerts_titled(s, "After kill").first().cloned().cloned()
        })
        .await;
    assert_eq!(alert["level"], "warning");

    // Graceful: SIGTERM node B. It drains, closing the session with 1001, and the page goes
    // to C at once (no backoff delay).
    browser.record_transitions().await;
    cluster.nodes[1].sigterm();
    let snap = browser.wait_open_on(&names[2]).await;
    let transitions = snap["transitions"].as_array().unwrap();
    assert_eq!(
        transitions.first(),
        Some(&json!({"state": "reconnecting", "code": 1001, "delay": 0})),
        "a drain reconnects at once: {transitions:?}"
    );
    let status = cluster.nodes[1].wait_exit(TIMEOUT).await;
    assert!(status.success(), "a drained node exits cleanly: {status}");

    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"info","title":"After drain","text":"served by C"}"#,
    ]);
    browser
        .wait_for("an alert after the drain", |s| {
            alerts_titled(s, "After drain").first().cloned().cloned()
        })
        .await;
    let snap = browser.snapshot().await;
    assert_eq!(
        alerts_titled(&snap, "After kill").len(),
        1,
        "no duplicates after failover"
    );
    assert_eq!(snap["state"], "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshot_of_the_demo_page_with_clock_alert_chat_and_logs() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1).await;
    let node = &cluster.nodes[0];
    let driver = Chromedriver::start().await;
    let browser = driver.browser("screenshot").await;
    browser
        .open(&page_url(node.port, "client_id=demo-tab"))
        .await;
    browser.wait_open_on(&node.name).await;

    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"warning","title":"Disk 90% full","text":"db-2: /var/lib/postgresql"}"#,
    ]);
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"critical","title":"Fire","text":"Building 3"}"#,
    ]);
    for line in [
        "2026-01-15T09:30:01Z INFO  api: GET /orders 200 12ms",
        "2026-01-15T09:30:02Z WARN  api: slow query on orders (840ms)",
        "2026-01-15T09:30:02Z INFO  worker: job 4411 done",
    ] {
        cluster.redis.cli(&["PUBLISH", "logs", line]);
    }
    browser.fill("chat-name", "Alice").await;
    browser
        .fill("chat-input", "Fire drill at 3pm, see the alert")
        .await;
    browser.click("chat-send").await;
    // Sending joined the room; a reply published server-side (as a bot would) shows there too.
    browser
        .wait_for("the page in room lobby", |s| {
            (s["api"]["room"] == "lobby").then_some(())
        })
        .await;
    cluster.redis.cli(&[
        "PUBLISH",
        "chat:lobby",
        r#"{"from":"Bob","text":"Evacuation route is the east stairs"}"#,
    ]);

    let snap = browser
        .wait_for("clock, two alerts, two chat messages and logs", |s| {
            (clock_iso(s).is_some()
                && s["alerts"].as_array()?.len() == 2
                && s["chat"].as_array()?.len() == 2
                && s["logs"].as_array()?.len() == 3)
                .then(|| s.clone())
        })
        .await;
    assert_eq!(snap["alerts"][0]["level"], "critical");
    assert_eq!(snap["chat"][0]["who"], "Alice:");
    assert_eq!(snap["chat"][0]["me"], true);
    assert_eq!(snap["chat"][1]["who"], "Bob:");
    // Let the clock show a fresh tick rather than the first one.
    clock_after(&browser, clock_iso(&snap).as_deref()).await;

    let png = browser.screenshot().await;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real PNG screenshot ({} bytes)",
        png.len()
    );
    let path = save_artifact("demo.png", &png);
    assert!(Path::new(&path).exists());
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_client_id_is_shown_on_the_page_and_not_retried() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1).await;
    let node = &cluster.nodes[0];
    let driver = Chromedriver::start().await;
    let browser = driver.browser("bad-client-id").await;
    browser
        .open(&page_url(node.port, "client_id=bad%20id"))
        .await;

    // `closed`, not `reconnecting`: the client library treats 4400 as final.
    let snap = browser
        .wait_for("the page to stop with 4400", |s| {
            (s["state"] == "closed").then(|| s.clone())
        })
        .await;
    let state = snap["state_text"].as_str().unwrap();
    assert!(
        state.contains("4400") && state.contains("bad client_id"),
        "the state says why: {state:?}"
    );
    let notice = snap["notice"].as_str().unwrap();
    assert!(
        notice.contains("4400") && notice.contains("Check client_id"),
        "the notice says what to do: {notice:?}"
    );
    let m = node.metrics().await;
    assert_eq!(
        m.get(r#"gateway_disconnects_total{reason="bad_request"}"#),
        1.0,
        "one attempt, no retries so far"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_site_imports_client_js_from_the_gateway_when_its_origin_is_allowed() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    // The site is http://localhost:S; the gateway is at 127.0.0.1:G, another origin (the host
    // differs, not only the port), so the import is a cross-origin module fetch.
    let site = SiteServer::start(INTEGRATOR_PAGE.to_owned()).await;
    let cluster = Cluster::builder()
        .nodes(1)
        .env(
            "GATEWAY__ORIGINS",
            &format!("http://localhost:{}", site.port),
        )
        .start()
        .await;
    let node = &cluster.nodes[0];
    let driver = Chromedriver::start().await;

    let browser = driver.browser("cors").await;
    browser
        .open(&format!("http://localhost:{}/?gw={}", site.port, node.port))
        .await;
    let welcome = browser
        .wait_for_site("the welcome on the other site", |s| {
            (s["imported"] == true && s["welcome"].is_object()).then(|| s["welcome"].clone())
        })
        .await;
    assert_eq!(welcome["node"], node.name.as_str());
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"info","title":"Cross-site","text":"from the gateway"}"#,
    ]);
    let alert = browser
        .wait_for_site("the alert on the other site", |s| {
            s["alerts"].as_array()?.first().cloned()
        })
        .await;
    assert_eq!(alert["title"], "Cross-site");

    // A site that is not in `origins` cannot import the module: no CORS header.
    let refused = driver.browser("cors-refused").await;
    refused
        .open(&format!("http://127.0.0.1:{}/?gw={}", site.port, node.port))
        .await;
    let error = refused
        .wait_for_site("the refused import", |s| {
            s["imported"].as_str().map(str::to_owned)
        })
        .await;
    assert!(error.contains("Failed to fetch"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_origins_a_page_from_one_local_node_fails_over_to_the_other() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    // README's two local nodes, as configured there: no `origins`, so the default rule.
    let mut cluster = Cluster::start(2).await;
    let (a, b) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let driver = Chromedriver::start().await;
    let browser = driver.browser("local-failover").await;
    // The page comes from node B and lists A first: its origin (B's port) differs from A's.
    browser
        .open(&page_url(b, &format!("ws={},{}", ws(a), ws(b))))
        .await;
    browser.wait_open_on(&names[0]).await;

    cluster.nodes[0].kill();
    browser.wait_open_on(&names[1]).await;
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"info","title":"Still here","text":"via node B"}"#,
    ]);
    browser
        .wait_for("an alert after the failover", |s| {
            alerts_titled(s, "Still here").first().cloned().cloned()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_node_without_redis_the_page_ticks_and_suggests_no_command_that_cannot_work() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    // `cargo run -p gateway` alone: the memory bus, and the node ticks itself.
    let node = tests::GatewayNode::start("gw-memory", &[]).await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser("memory-bus").await;
    browser.open(&page_url(node.port, "")).await;
    let snap = browser.wait_open_on(&node.name).await;
    for key in ["alerts_hint", "logs_hint"] {
        let hint = snap[key].as_str().unwrap();
        assert!(hint.contains("without Redis"), "{key}: {hint:?}");
        assert!(
            !hint.contains("Try") && !hint.contains("docker compose"),
            "{key}: no command to run against this node: {hint:?}"
        );
    }
    let first = clock_after(&browser, None).await;
    clock_after(&browser, clock_iso(&first).as_deref()).await;
}

/// A plain TCP proxy to 127.0.0.1:`upstream` that refuses every WebSocket upgrade (403), as
/// some corporate proxies do, and passes everything else through byte for byte (streams
/// included). Returns its port; it lives as long as the test's runtime.
async fn proxy_refusing_websockets(upstream: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("\r\nupgrade: websocket") {
                    let _ = client
                        .write_all(
                            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                if server.write_all(&head).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_that_refuses_websockets_the_page_falls_back_to_sse() {
    let _one_browser_test_at_a_time = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1).await;
    let node = &cluster.nodes[0];
    let proxy = proxy_refusing_websockets(node.port).await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser("sse-fallback").await;
    browser.open(&page_url(proxy, "client_id=sse-tab")).await;

    let snap = browser.wait_open_on(&node.name).await;
    assert_eq!(
        snap["transport"], "SSE",
        "the page shows its transport: {snap:#}"
    );
    let m = node.metrics().await;
    assert_eq!(m.get(r#"gateway_connections{transport="sse"}"#), 1.0);
    assert_eq!(m.get(r#"gateway_connections{transport="ws"}"#), 0.0);

    // The clock runs over the event stream.
    let first = clock_after(&browser, None).await;
    let later = clock_after(&browser, clock_iso(&first).as_deref()).await;
    assert!(seq_number(&later) > seq_number(&first));

    // An alert from redis-cli appears.
    cluster.redis.cli(&[
        "PUBLISH",
        "alerts",
        r#"{"level":"warning","title":"Over SSE","text":"no WebSocket needed"}"#,
    ]);
    let alert = browser
        .wait_for("the alert", |s| {
            alerts_titled(s, "Over SSE").first().cloned().cloned()
        })
        .await;
    assert_eq!(alert["level"], "warning");

    // Client frames go by POST: joining the chat room and sending a message round-trips.
    browser.fill("chat-name", "Sse").await;
    browser.fill("chat-input", "typed over SSE").await;
    browser.click("chat-send").await;
    let mine = browser
        .wait_for("the chat message", |s| {
            s["chat"]
                .as_array()?
                .iter()
                .find(|m| m["text"] == "typed over SSE")
                .cloned()
        })
        .await;
    assert_eq!(mine["who"], "Sse:");
    assert_eq!(mine["me"], true);
}
