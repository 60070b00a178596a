//! A real Kubernetes API server for the end-to-end tests: Debian's `etcd` and a
//! `kube-apiserver` built by `cargo xtask setup`, both on loopback inside a network namespace
//! the test created (the lab's node namespace, where the daemon runs).
//!
//! Each [`ApiServer`] gets its own work directory (etcd data, certificates, logs), free ports
//! picked inside that namespace, a serving certificate from the test PKI for `127.0.0.1`, a
//! service-account signing key (so `TokenRequest` works) and an admin token
//! (`system:masters`, from a static token file) for the test's own requests. Authorization
//! is RBAC only. There is no controller-manager, scheduler or kubelet: the test is all of
//! them (pods are created with `spec.nodeName` set and their status written through
//! `/status`; pods are deleted with grace period 0). Both processes are stopped by pid when
//! the value is dropped.
//!
//! The test talks to the server with a kube-rs client whose runtime threads live in that
//! namespace (every socket they open is a socket of the namespace); [`ApiServer::run`] runs a
//! future there.
use std::{
    fs,
    future::Future,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use hyper::Request;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

use crate::pki::TestCa;

/// Where `cargo xtask setup` puts the kube-apiserver binary; must match `xtask/src/setup.rs`.
/// `REDIRECTOR_KUBE_APISERVER` overrides it.
pub const KUBE_VERSION: &str = "1.20.2";
const ETCD: &str = "/usr/bin/etcd";
const START_TIMEOUT: Duration = Duration::from_secs(90);
const ADMIN_TOKEN: &str = "rdr-test-admin-token";

/// The kube-apiserver binary: `$REDIRECTOR_KUBE_APISERVER`, else
/// `$HOME/.cache/redirector/kube-apiserver-<KUBE_VERSION>/kube-apiserver`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIRECTOR_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home)
        .join(".cache/redirector")
        .join(format!("kube-apiserver-{KUBE_VERSION}"))
        .join("kube-apiserver")
}

/// What is missing to start a real API server here (empty: nothing).
pub fn missing_prerequisites() -> Vec<String> {
    let mut out = Vec::new();
    let bin = binary();
    if !bin.is_file() {
        out.push(format!(
            "{} missing (`cargo xtask setup` builds it)",
            bin.display()
        ));
    }
    if !Path::new(ETCD).is_file() {
        out.push(format!(
            "{ETCD} missing (Debian package etcd-server; `cargo xtask setup` installs it)"
        ));
    }
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !kubectl {
        out.push("kubectl not runnable (renders deploy/ with kustomize)".into());
    }
    out
}

/// Like [`crate::priv_check::privileged`] for the real API server: in CI a missing
/// prerequisite fails the test; elsewhere the skip is printed.
pub fn available(test: &str) -> bool {
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: real API server prerequisites missing in CI: {why}");
    }
    eprintln!("skipped {test}: {why}");
    false
}

/// A running etcd + kube-apiserver pair on loopback in one network namespace.
pub struct ApiServer {
    netns: String,
    dir: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    /// The secure port on 127.0.0.1 in the namespace.
    pub port: u16,
    ca_path: PathBuf,
    admin_kubeconfig: PathBuf,
    rt: tokio::runtime::Runtime,
    client: Client,
    starts: u32,
    /// How long each start took until `/readyz` answered 200, for the record.
    pub start_times: Vec<Duration>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            stop(child, libc::SIGKILL, Duration::from_secs(10));
        }
    }
}

/// Signals one process we started (by pid), waits up to `grace` for it to exit, then kills
/// it, and reaps it.
fn stop(mut child: Child, sig: i32, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe { libc::kill(child.id() as i32, sig) };
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().ok()
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A kubeconfig for `https://127.0.0.1:port` trusting `ca` and sending `token`.
fn kubeconfig_text(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
         certificate-authority: {ca}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  \
         context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        ca = ca.display()
    )
}

/// A kube client for `kubeconfig`; must run on the namespace's runtime.
async fn client_from(kubeconfig: PathBuf) -> Client {
    let file = Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .expect("load kubeconfig");
    Client::try_from(config).expect("kube client")
}

impl ApiServer {
    /// Starts etcd and kube-apiserver in `netns` with their files in `dir` and waits until
    /// the API server's `/readyz` says ok (panics after 90 s with both logs' tails).
    pub fn start(netns: &str, dir: &Path) -> ApiServer {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        // Free ports of this namespace: bound together, so they differ, then released.
        let [etcd_client, etcd_peer, port] = in_netns(netns, || {
            let ls: Vec<TcpListener> = (0..3)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
                .collect();
            [0, 1, 2].map(|i| ls[i].local_addr().expect("local addr").port())
        });

        let pki = TestCa::with_name("rdr kube ca", &dir.join("pki"));
        let ca_path = pki.write_ca(&dir.join("pki"));
        let serving = pki.issue(&["127.0.0.1", "localhost", "kubernetes.default.svc"]);
        // The service-account token signer: any key pair will do; the public half is read
        // from the certificate.
        let signer = pki.issue(&["service-accounts"]);
        let tokens = dir.join("tokens.csv");
        write(
            &tokens,
            &format!("{ADMIN_TOKEN},rdr-test-admin,rdr-test-admin,\"system:masters\"\n"),
        );
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write(
            &admin_kubeconfig,
            &kubeconfig_text(port, &ca_path, ADMIN_TOKEN),
        );

        let etcd_dir = dir.join("etcd");
        let etcd_args: Vec<String> = vec![
            "--name".into(),
            "rdr".into(),
            "--data-dir".into(),
            etcd_dir.display().to_string(),
            "--listen-client-urls".into(),
            format!("http://127.0.0.1:{etcd_client}"),
            "--advertise-client-urls".into(),
            format!("http://127.0.0.1:{etcd_client}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-cluster".into(),
            format!("rdr=http://127.0.0.1:{etcd_peer}"),
            "--logger".into(),
            "zap".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let etcd = spawn_in(netns, Path::new(ETCD), &etcd_args, &dir.join("etcd.log"));
        let etcd_addr: SocketAddr = ([127, 0, 0, 1], etcd_client).into();
        let end = Instant::now() + START_TIMEOUT;
        while !in_netns(netns, move || {
            TcpStream::connect_timeout(&etcd_addr, Duration::from_millis(200)).is_ok()
        }) {
            assert!(
                Instant::now() < end,
                "etcd did not listen:\n{}",
                tail(&dir.join("etcd.log"), 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        let p = |p: &Path| p.display().to_string();
        let apiserver_args: Vec<String> = [
            "--etcd-servers",
            &format!("http://127.0.0.1:{etcd_client}"),
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            &port.to_string(),
            "--insecure-port",
            "0",
            "--cert-dir",
            &p(&dir.join("certs")),
            "--tls-cert-file",
            &p(&serving.cert_pem_path),
            "--tls-private-key-file",
            &p(&serving.key_pem_path),
            "--token-auth-file",
            &p(&tokens),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--service-account-key-file",
            &p(&signer.cert_pem_path),
            "--service-account-signing-key-file",
            &p(&signer.key_pem_path),
            "--service-cluster-ip-range",
            "10.96.0.0/16",
            // No endpoints controller to keep the `kubernetes` Service's endpoints, and no
            // controller-manager to create each namespace's `default` ServiceAccount.
            "--endpoint-reconciler-type",
            "none",
            "--disable-admission-plugins",
            "ServiceAccount",
            "--profiling=false",
            "--v",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();

        let ns_path = format!("/run/netns/{netns}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                let f = fs::File::open(&ns_path).expect("open netns");
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            })
            .build()
            .expect("tokio runtime");
        let kc = admin_kubeconfig.clone();
        let client = rt.block_on(rt.spawn(client_from(kc))).expect("client task");
        let mut api = ApiServer {
            netns: netns.to_owned(),
            dir: dir.to_owned(),
            etcd: Some(etcd),
            apiserver: None,
            apiserver_args,
            port,
            ca_path,
            admin_kubeconfig,
            rt,
            client,
            starts: 0,
            start_times: Vec::new(),
        };
        api.start_apiserver();
        api
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("kube-apiserver-{}.log", self.starts))
    }

    fn start_apiserver(&mut self) {
        self.starts += 1;
        let log = self.log_path();
        let started = Instant::now();
        let mut child = spawn_in(&self.netns, &binary(), &self.apiserver_args, &log);
        let end = started + START_TIMEOUT;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("kube-apiserver exited ({s}):\n{}", tail(&log, 40));
            }
            if self.readyz() == Some(200) {
                break;
            }
            if Instant::now() > end {
                stop(child, libc::SIGKILL, Duration::from_secs(10));
                panic!(
                    "kube-apiserver not ready after {START_TIMEOUT:?}:\n{}\netcd:\n{}",
                    tail(&log, 40),
                    tail(&self.dir.join("etcd.log"), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = started.elapsed();
        eprintln!("kube-apiserver {KUBE_VERSION} ready after {took:?}");
        self.start_times.push(took);
        self.apiserver = Some(child);
    }

    /// The status code of `GET /readyz` (None: not reachable).
    pub fn readyz(&self) -> Option<u16> {
        let client = self.client.clone();
        self.run(async move {
            let req = Request::get("/readyz").body(Vec::new()).ok()?;
            match client.request_text(req).await {
                Ok(_) => Some(200),
                Err(kube::Error::Api(s)) => Some(s.code),
                Err(_) => None,
            }
        })
    }

    /// Stops the API server only (etcd keeps running), as a control-plane node's restart
    /// does: SIGTERM, then SIGKILL if it has not exited after 5 s (v1.20.2 closes its port at
    /// once on SIGTERM but, with watches open, was still running after 20 s here).
    /// [`ApiServer::resume`] starts it again.
    pub fn stop_apiserver(&mut self) {
        let child = self.apiserver.take().expect("api server running");
        let t = Instant::now();
        let status = stop(child, libc::SIGTERM, Duration::from_secs(5));
        eprintln!("kube-apiserver stopped after {:?}: {status:?}", t.elapsed());
    }

    /// Starts the API server again with the same etcd, port, keys and flags, and waits until
    /// it is ready.
    pub fn resume(&mut self) {
        assert!(self.apiserver.is_none(), "api server already running");
        self.start_apiserver();
    }

    /// Runs `f` on the runtime whose threads live in the server's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        self.rt
            .block_on(self.rt.spawn(f))
            .expect("api task panicked")
    }

    /// The admin client (`system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client that authenticates with `token` (e.g. a service account's).
    pub fn client_with_token(&self, token: &str) -> Client {
        let path = self.dir.join(format!("token-{}.kubeconfig", fnv(token)));
        self.write_kubeconfig(&path, token);
        self.run(client_from(path))
    }

    /// Writes a kubeconfig for this server with `token` to `path`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        write(path, &kubeconfig_text(self.port, &self.ca_path, token));
    }

    /// `kubectl args…` as admin, inside the namespace, with `stdin` as its input.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("kubectl")
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("kubectl stdin");
        child.wait_with_output().expect("kubectl")
    }

    /// A token for service account `ns/name` from the TokenRequest API (one hour).
    pub fn token(&self, ns: &str, name: &str) -> String {
        let client = self.client();
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}/token");
        let v: Value = self
            .run(async move {
                let body = json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": { "expirationSeconds": 3600 },
                });
                let req = Request::post(path)
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).expect("json"))
                    .expect("request");
                client.request::<Value>(req).await
            })
            .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{name}: {e}"));
        v["status"]["token"]
            .as_str()
            .expect("token in TokenRequest status")
            .to_owned()
    }

    /// Creates a namespace with `labels`.
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": labels_json(labels) },
        }))
        .expect("namespace json");
        let api: Api<Namespace> = Api::all(self.client());
        self.run(async move { api.create(&PostParams::default(), &ns).await })
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    /// Sets (`Some`) or removes (`None`) one label of a namespace.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        let api: Api<Namespace> = Api::all(self.client());
        let patch = json!({ "metadata": { "labels": { key: value } } });
        let name2 = name.to_owned();
        self.run(async move {
            api.patch(&name2, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })
        .unwrap_or_else(|e| panic!("label namespace {name}: {e}"));
    }

    /// Creates a pod from its JSON; returns the object the server stored, or its refusal.
    pub fn try_create_pod(&self, pod: &Value) -> Result<Value, kube::Error> {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .expect("pod namespace")
            .to_owned();
        let pod: Pod = serde_json::from_value(pod.clone()).expect("pod json");
        let api: Api<Pod> = Api::namespaced(self.client(), &ns);
        let created = self.run(async move { api.create(&PostParams::default(), &pod).await })?;
        Ok(serde_json::to_value(created).expect("pod to json"))
    }

    /// A JSON merge patch on a pod; returns the patched object or the server's refusal.
    pub fn try_patch_pod(&self, ns: &str, name: &str, patch: Value) -> Result<Value, kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let name = name.to_owned();
        let pod = self.run(async move {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })?;
        Ok(serde_json::to_value(pod).expect("pod to json"))
    }

    /// Writes `status` through the pod's `/status` subresource, as the kubelet does.
    pub fn patch_pod_status(&self, ns: &str, name: &str, status: Value) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let patch = json!({ "status": status });
        let name2 = name.to_owned();
        self.run(async move {
            api.patch_status(&name2, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })
        .unwrap_or_else(|e| panic!("write status of {ns}/{name}: {e}"));
    }

    /// Sets (`Some`) or removes (`None`) one label of a pod.
    pub fn label_pod(&self, ns: &str, name: &str, key: &str, value: Option<&str>) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let patch = json!({ "metadata": { "labels": { key: value } } });
        let name2 = name.to_owned();
        self.run(async move {
            api.patch(&name2, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })
        .unwrap_or_else(|e| panic!("label pod {ns}/{name}: {e}"));
    }

    /// Deletes a pod with grace period 0. With no kubelet to confirm a graceful stop, any
    /// other grace period leaves a bound pod `Terminating` for good.
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let name2 = name.to_owned();
        self.run(async move {
            api.delete(
                &name2,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await
        })
        .unwrap_or_else(|e| panic!("delete pod {ns}/{name}: {e}"));
    }

    /// The pod as the server has it, or None.
    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Value> {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let name2 = name.to_owned();
        self.run(async move { api.get_opt(&name2).await })
            .unwrap_or_else(|e| panic!("get pod {ns}/{name}: {e}"))
            .map(|p| serde_json::to_value(p).expect("pod to json"))
    }
}

fn spawn_in(netns: &str, program: &Path, args: &[String], log: &Path) -> Child {
    let f = fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup log"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
