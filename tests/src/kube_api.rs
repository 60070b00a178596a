//! In-test Kubernetes API stand-in: namespaces and pods over real list/watch JSON, with fault injection.
//!
//! The Kubernetes end-to-end tests run against a real kube-apiserver (`kube_apiserver.rs`);
//! this stand-in remains for what a real server cannot be made to do at a chosen moment
//! (end every watch stream, answer 503 while its store changes, answer a watch with `410
//! Gone`, send a bookmark now) and for the unprivileged in-process watcher tests.
//!
//! A plain-HTTP/1.1 hyper server on `127.0.0.1:0` that behaves like the API server for what
//! the redirector's watcher uses: `GET /api/v1/namespaces`, `/api/v1/pods` and
//! `/api/v1/namespaces/{ns}/pods`, as lists (`{"kind":"PodList",...}`) or, with `watch=1`,
//! as newline-delimited watch events (`{"type":"ADDED","object":{...}}`). It honours
//! `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`), `fieldSelector` (`=`, `==`, `!=` on the
//! fields the real server supports), `resourceVersion` (a watch replays every change after it),
//! `allowWatchBookmarks` and `timeoutSeconds`.
//!
//! Like the real server, one counter orders every change; a watch with a selector sees
//! `ADDED` when an object starts matching and `DELETED` when it stops; an expired resource
//! version is answered `200` with a single `ERROR` event carrying a `410 Expired` status.
//!
//! Tests mutate state synchronously (`create_namespace`, `label_pod`, ...) and inject faults:
//! [`KubeApi::drop_watches`], [`KubeApi::expire_resource_versions`],
//! [`KubeApi::send_bookmarks`] and [`KubeApi::set_unavailable`]. [`KubeApi::stats`] counts
//! requests so a test can wait for the client to have reacted.
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Frame, body::Incoming, header,
    server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, sync::watch, task::JoinHandle, task::JoinSet};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Timestamp on every object the stand-in makes; its value never matters to the watcher.
const CREATED: &str = "2025-01-01T00:00:00Z";

/// The two resources the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Namespaces,
    Pods,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
        }
    }

    /// Field selectors the real API server accepts for this resource.
    fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Resource::Namespaces => &["metadata.name", "status.phase"],
            Resource::Pods => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
        }
    }
}

/// Request counters, for waiting until the client has reacted to a fault.
#[derive(Clone, Debug, Default)]
pub struct ApiStats {
    /// List requests answered, by resource name.
    pub lists: BTreeMap<&'static str, u64>,
    /// Watch requests accepted (including those answered with 410), by resource name.
    pub watches: BTreeMap<&'static str, u64>,
    /// Watch streams open right now, by resource name.
    pub open_watches: BTreeMap<&'static str, usize>,
    /// Watches answered with `410 Gone`.
    pub gone: u64,
    /// Requests refused while unavailable.
    pub refused: u64,
    /// Bookmark events sent.
    pub bookmarks: u64,
}

impl ApiStats {
    pub fn lists(&self, r: Resource) -> u64 {
        self.lists.get(r.name()).copied().unwrap_or(0)
    }
    pub fn watches(&self, r: Resource) -> u64 {
        self.watches.get(r.name()).copied().unwrap_or(0)
    }
    pub fn open(&self, r: Resource) -> usize {
        self.open_watches.get(r.name()).copied().unwrap_or(0)
    }
}

/// A running API stand-in; the server stops when this is dropped.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

struct Shared {
    store: Mutex<Store>,
    stats: watch::Sender<ApiStats>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One change, kept so that a watch from an older resource version can replay it.
struct Change {
    resource: Resource,
    /// The object before the change; `None` for a creation.
    before: Option<Value>,
    /// The object after the change (for a deletion: its last state, with the deletion's rv).
    after: Value,
    deleted: bool,
    rv: u64,
}

/// A label or field requirement.
#[derive(Clone, Debug)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default)]
struct Filter {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::Ne(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|r| match r {
            Requirement::Eq(k, v) => field(obj, k) == *v,
            Requirement::Ne(k, v) => field(obj, k) != *v,
            Requirement::Exists(_) | Requirement::NotExists(_) => false,
        });
        labels_ok && fields_ok
    }
}

/// A field's value as field selectors compare it: missing and null are the empty string.
fn field(obj: &Value, path: &str) -> String {
    let v = path.split('.').fold(obj, |v, key| &v[key]);
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

struct Watcher {
    resource: Resource,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resource version below this get `410 Gone`.
    oldest_valid_rv: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    history: VecDeque<Change>,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher: u64,
    unavailable: bool,
}

impl Store {
    fn objects(&self, resource: Resource) -> Vec<&Value> {
        match resource {
            Resource::Namespaces => self.namespaces.values().collect(),
            Resource::Pods => self.pods.values().collect(),
        }
    }

    /// Records a change under a fresh resource version and sends it to every open watch.
    fn commit(
        &mut self,
        resource: Resource,
        before: Option<Value>,
        mut after: Value,
        deleted: bool,
    ) {
        self.rv += 1;
        after["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if !deleted {
            match resource {
                Resource::Namespaces => {
                    let name = after["metadata"]["name"]
                        .as_str()
                        .expect("namespace name")
                        .to_owned();
                    self.namespaces.insert(name, after.clone());
                }
                Resource::Pods => {
                    let key = pod_key(&after);
                    self.pods.insert(key, after.clone());
                }
            }
        }
        let change = Change {
            resource,
            before,
            after,
            deleted,
            rv: self.rv,
        };
        self.watchers.retain(|_, w| match w.translate(&change) {
            Some(line) => w.tx.send(line).is_ok(),
            None => true,
        });
        self.history.push_back(change);
    }
}

impl Watcher {
    /// The event line this watch sees for `change`, if any.
    fn translate(&self, change: &Change) -> Option<Bytes> {
        if change.resource != self.resource {
            return None;
        }
        let was = change
            .before
            .as_ref()
            .is_some_and(|b| self.filter.matches(b));
        let is = !change.deleted && self.filter.matches(&change.after);
        let kind = match (was, is) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        Some(event_line(kind, &change.after))
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn pod_key(pod: &Value) -> (String, String) {
    let meta = &pod["metadata"];
    let s = |k: &str| {
        meta[k]
            .as_str()
            .unwrap_or_else(|| panic!("pod without metadata.{k}"))
            .to_owned()
    };
    (s("namespace"), s("name"))
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// A Namespace object as the API server returns it (without resourceVersion).
pub fn namespace_json(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = labels_json(labels);
    l["kubernetes.io/metadata.name"] = json!(name);
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": format!("00000000-0000-4000-8000-{:012x}", fnv(name)),
            "creationTimestamp": CREATED,
            "labels": l,
        },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

/// A running Pod object as the API server returns it (without resourceVersion). `qos` is
/// `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`); empty leaves it out.
pub fn pod_json(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    qos: &str,
) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid,
            "creationTimestamp": CREATED,
            "labels": labels_json(labels),
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default",
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
        },
        "status": { "phase": "Running" },
    });
    if !qos.is_empty() {
        pod["status"]["qosClass"] = json!(qos);
    }
    pod
}

/// Small stable hash for made-up namespace UIDs.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) & 0xffff_ffff_ffff
}

impl KubeApi {
    /// Starts the stand-in on a free loopback port.
    pub async fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the kube api stand-in");
        let addr = listener.local_addr().expect("kube api stand-in address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                ..Store::default()
            }),
            stats: watch::Sender::new(ApiStats::default()),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        KubeApi {
            addr,
            shared,
            server,
        }
    }

    /// Starts the stand-in on a listener the caller bound, e.g. one bound inside another
    /// network namespace (a socket stays in the namespace it was created in), so that a
    /// daemon running there can reach it. [`KubeApi::url`] and [`KubeApi::kubeconfig`] use
    /// the listener's address. Must be called within a tokio runtime.
    pub async fn start_on(listener: std::net::TcpListener) -> KubeApi {
        listener
            .set_nonblocking(true)
            .expect("kube api stand-in listener: set_nonblocking");
        let addr = listener.local_addr().expect("kube api stand-in address");
        let listener =
            TcpListener::from_std(listener).expect("kube api stand-in listener into tokio");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                ..Store::default()
            }),
            stats: watch::Sender::new(ApiStats::default()),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        KubeApi {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {url}\n\
             users:\n- name: stand-in\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    \
             cluster: stand-in\n    user: stand-in\n    namespace: default\ncurrent-context: stand-in\n",
            url = self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    pub fn stats(&self) -> ApiStats {
        self.shared.stats.borrow().clone()
    }

    /// Waits (bounded) until `pred` holds for the request counters; panics with them otherwise.
    pub async fn wait_stats(&self, what: &str, pred: impl Fn(&ApiStats) -> bool) {
        let mut rx = self.shared.stats.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| pred(s))).await;
        if waited.is_err() {
            panic!(
                "timed out waiting for the kube api stand-in: {what}; stats: {:?}",
                self.stats()
            );
        }
    }

    /// The current resource version (the last change's).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        self.create(namespace_json(name, labels));
    }

    /// Sets (`Some`) or removes (`None`) a namespace label.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        self.update_namespace(name, |ns| set_label(ns, key, value));
    }

    /// Deletes a namespace and, first, every pod in it (the namespace controller's job).
    pub fn delete_namespace(&self, name: &str) {
        let mut store = self.shared.store();
        let pods: Vec<_> = store
            .pods
            .keys()
            .filter(|(ns, _)| ns == name)
            .cloned()
            .collect();
        for key in pods {
            let pod = store.pods.remove(&key).expect("pod present");
            store.commit(Resource::Pods, Some(pod.clone()), pod, true);
        }
        let ns = store
            .namespaces
            .remove(name)
            .unwrap_or_else(|| panic!("no namespace {name}"));
        store.commit(Resource::Namespaces, Some(ns.clone()), ns, true);
    }

    pub fn create_pod(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        node: &str,
        labels: &[(&str, &str)],
        qos: &str,
    ) {
        self.create(pod_json(ns, name, uid, node, labels, qos));
    }

    /// Creates any Namespace or Pod object (e.g. a `pod_json` with `spec.hostNetwork` set).
    pub fn create(&self, obj: Value) {
        let mut store = self.shared.store();
        let resource = match obj["kind"].as_str() {
            Some("Namespace") => {
                let name = obj["metadata"]["name"].as_str().expect("namespace name");
                assert!(
                    !store.namespaces.contains_key(name),
                    "namespace {name} already exists"
                );
                Resource::Namespaces
            }
            Some("Pod") => {
                let key = pod_key(&obj);
                assert!(
                    store.namespaces.contains_key(&key.0),
                    "namespace {} does not exist",
                    key.0
                );
                assert!(!store.pods.contains_key(&key), "pod {key:?} already exists");
                Resource::Pods
            }
            other => panic!("the stand-in serves namespaces and pods, not {other:?}"),
        };
        store.commit(resource, None, obj, false);
    }

    pub fn update_namespace(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let mut store = self.shared.store();
        let before = store
            .namespaces
            .get(name)
            .unwrap_or_else(|| panic!("no namespace {name}"))
            .clone();
        let mut after = before.clone();
        f(&mut after);
        store.commit(Resource::Namespaces, Some(before), after, false);
    }

    pub fn update_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut store = self.shared.store();
        let key = (ns.to_owned(), name.to_owned());
        let before = store
            .pods
            .get(&key)
            .unwrap_or_else(|| panic!("no pod {ns}/{name}"))
            .clone();
        let mut after = before.clone();
        f(&mut after);
        assert_eq!(pod_key(&after), key, "a pod update cannot rename the pod");
        store.commit(Resource::Pods, Some(before), after, false);
    }

    /// Sets (`Some`) or removes (`None`) a pod label.
    pub fn label_pod(&self, ns: &str, name: &str, key: &str, value: Option<&str>) {
        self.update_pod(ns, name, |pod| set_label(pod, key, value));
    }

    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        self.update_pod(ns, name, |pod| pod["status"]["phase"] = json!(phase));
    }

    /// Starts a graceful deletion: sets `deletionTimestamp`, as the API does before the kubelet
    /// has stopped the containers. [`KubeApi::delete_pod`] finishes it.
    pub fn mark_pod_terminating(&self, ns: &str, name: &str) {
        self.update_pod(ns, name, |pod| {
            pod["metadata"]["deletionTimestamp"] = json!(CREATED);
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        });
    }

    /// Removes a pod (a `DELETED` event).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut store = self.shared.store();
        let pod = store
            .pods
            .remove(&(ns.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no pod {ns}/{name}"));
        store.commit(Resource::Pods, Some(pod.clone()), pod, true);
    }

    /// Closes every open watch stream (the client sees a clean end of stream, as when an API
    /// server restarts or a load balancer drops an idle connection).
    pub fn drop_watches(&self) {
        // Dropping the senders ends each stream once it has sent what was already queued.
        self.shared.store().watchers.clear();
    }

    /// Forgets the change history: the next watch from any resource version seen so far gets
    /// a `410 Gone` (`ERROR` event, reason `Expired`), which forces the client to re-list.
    /// Open watches are not touched; combine with [`KubeApi::drop_watches`].
    pub fn expire_resource_versions(&self) {
        let mut store = self.shared.store();
        // Like an etcd compaction past every version handed out; the version moves on so that
        // a list taken afterwards is watchable.
        store.rv += 1;
        store.oldest_valid_rv = store.rv;
        store.history.clear();
    }

    /// Sends a `BOOKMARK` with the current resource version on every watch that asked for them.
    pub fn send_bookmarks(&self) {
        let mut store = self.shared.store();
        let rv = store.rv.to_string();
        let mut sent = 0;
        store.watchers.retain(|_, w| {
            if !w.bookmarks {
                return true;
            }
            let obj = json!({
                "apiVersion": "v1",
                "kind": w.resource.kind(),
                "metadata": { "resourceVersion": rv },
            });
            sent += 1;
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
        drop(store);
        self.shared.stats.send_modify(|s| s.bookmarks += sent);
    }

    /// While unavailable every request gets `503 Service Unavailable` (mutations still apply,
    /// as through another API server). Open watches are not touched.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.store().unavailable = unavailable;
    }
}

fn set_label(obj: &mut Value, key: &str, value: Option<&str>) {
    let labels = &mut obj["metadata"]["labels"];
    if labels.is_null() {
        *labels = json!({});
    }
    let labels = labels.as_object_mut().expect("labels are an object");
    match value {
        Some(v) => labels.insert(key.to_owned(), json!(v)),
        None => labels.remove(key),
    };
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            // A client going away mid-watch is normal; nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if shared.store().unavailable {
        shared.stats.send_modify(|s| s.refused += 1);
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in only serves GET",
        );
    }
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let (resource, namespace) = match segments.as_slice() {
        ["", "api", "v1", "namespaces"] => (Resource::Namespaces, None),
        ["", "api", "v1", "pods"] => (Resource::Pods, None),
        ["", "api", "v1", "namespaces", ns, "pods"] => (Resource::Pods, Some(ns.to_string())),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource {path}"),
            );
        }
    };
    let query = parse_query(req.uri().query().unwrap_or(""));
    let mut filter = match parse_filter(resource, &query) {
        Ok(f) => f,
        Err(msg) => return status(StatusCode::BAD_REQUEST, "BadRequest", &msg),
    };
    if let Some(ns) = namespace {
        filter
            .fields
            .push(Requirement::Eq("metadata.namespace".into(), ns));
    }
    let flag = |k: &str| query.get(k).is_some_and(|v| v == "1" || v == "true");
    if flag("watch") {
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok());
        watch(
            shared,
            resource,
            filter,
            query.get("resourceVersion").map(String::as_str),
            flag("allowWatchBookmarks"),
            timeout,
        )
    } else {
        list(shared, resource, &filter)
    }
}

fn list(shared: &Arc<Shared>, resource: Resource, filter: &Filter) -> Response<Body> {
    let store = shared.store();
    let items: Vec<&Value> = store
        .objects(resource)
        .into_iter()
        .filter(|o| filter.matches(o))
        .collect();
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": "v1",
        "metadata": { "resourceVersion": store.rv.to_string() },
        "items": items,
    });
    drop(store);
    shared
        .stats
        .send_modify(|s| *s.lists.entry(resource.name()).or_default() += 1);
    json_response(StatusCode::OK, &body)
}

fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    filter: Filter,
    resource_version: Option<&str>,
    bookmarks: bool,
    timeout_secs: Option<u64>,
) -> Response<Body> {
    let from = match resource_version
        .filter(|v| !v.is_empty())
        .map(str::parse::<u64>)
    {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(rv)) => Some(rv),
        Some(Err(_)) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid resourceVersion",
            );
        }
    };
    let mut store = shared.store();
    shared
        .stats
        .send_modify(|s| *s.watches.entry(resource.name()).or_default() += 1);
    let (tx, rx) = mpsc::unbounded_channel();
    match from {
        Some(rv) if rv < store.oldest_valid_rv => {
            let gone = json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {rv} ({})", store.oldest_valid_rv),
                "reason": "Expired",
                "code": 410,
            });
            drop(store);
            shared.stats.send_modify(|s| s.gone += 1);
            let line = event_line("ERROR", &gone);
            return stream_response(futures::stream::iter([line]).boxed());
        }
        Some(rv) => {
            let w = Watcher {
                resource,
                filter,
                bookmarks,
                tx,
            };
            for change in store.history.iter().filter(|c| c.rv > rv) {
                if let Some(line) = w.translate(change) {
                    let _ = w.tx.send(line);
                }
            }
            register(&mut store, w);
        }
        None => {
            // No version: the current state as synthetic ADDED events, then changes.
            for obj in store
                .objects(resource)
                .into_iter()
                .filter(|o| filter.matches(o))
            {
                let _ = tx.send(event_line("ADDED", obj));
            }
            register(
                &mut store,
                Watcher {
                    resource,
                    filter,
                    bookmarks,
                    tx,
                },
            );
        }
    }
    drop(store);
    let open = OpenWatch::new(shared.clone(), resource);
    let deadline = timeout_secs.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let lines = futures::stream::unfold((rx, open), move |(mut rx, open)| async move {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok().flatten(),
            None => rx.recv().await,
        };
        next.map(|line| (line, (rx, open)))
    });
    stream_response(lines.boxed())
}

fn register(store: &mut Store, w: Watcher) {
    let id = store.next_watcher;
    store.next_watcher += 1;
    store.watchers.insert(id, w);
}

/// Counts an open watch stream for as long as its response body lives.
struct OpenWatch {
    shared: Arc<Shared>,
    resource: Resource,
}

impl OpenWatch {
    fn new(shared: Arc<Shared>, resource: Resource) -> Self {
        shared
            .stats
            .send_modify(|s| *s.open_watches.entry(resource.name()).or_default() += 1);
        OpenWatch { shared, resource }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.shared
            .stats
            .send_modify(|s| *s.open_watches.entry(self.resource.name()).or_default() -= 1);
    }
}

fn stream_response(lines: futures::stream::BoxStream<'static, Bytes>) -> Response<Body> {
    let body = StreamBody::new(lines.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(body))
        .expect("watch response")
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("json");
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .expect("json response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

/// Decodes `application/x-www-form-urlencoded` query pairs.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s)
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn parse_filter(resource: Resource, query: &BTreeMap<String, String>) -> Result<Filter, String> {
    let mut filter = Filter::default();
    if let Some(s) = query.get("labelSelector") {
        filter.labels = parse_selector(s, true)?;
    }
    if let Some(s) = query.get("fieldSelector") {
        filter.fields = parse_selector(s, false)?;
        for r in &filter.fields {
            let (Requirement::Eq(k, _) | Requirement::Ne(k, _)) = r else {
                unreachable!()
            };
            if !resource.selectable_fields().contains(&k.as_str()) {
                return Err(format!(
                    "field label not supported: {k}: \"{k}\" is not a known field selector for {}",
                    resource.name()
                ));
            }
        }
    }
    Ok(filter)
}

/// Parses the equality-based selector grammar; set-based terms (`in`, `notin`) are refused.
fn parse_selector(s: &str, labels: bool) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad = || format!("unable to parse requirement: {term:?}");
        let (key, req) = if let Some((k, v)) = term.split_once("!=") {
            (k, Requirement::Ne(k.trim().into(), v.trim().into()))
        } else if let Some((k, v)) = term.split_once("==") {
            (k, Requirement::Eq(k.trim().into(), v.trim().into()))
        } else if let Some((k, v)) = term.split_once('=') {
            (k, Requirement::Eq(k.trim().into(), v.trim().into()))
        } else if !labels {
            return Err(bad());
        } else if let Some(k) = term.strip_prefix('!') {
            (k, Requirement::NotExists(k.trim().into()))
        } else {
            (term, Requirement::Exists(term.into()))
        };
        let key = key.trim();
        if key.is_empty() || key.contains(' ') || key.contains('(') {
            return Err(bad());
        }
        out.push(req);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let pod = pod_json(
            "apps",
            "a",
            "u",
            "node-1",
            &[("app", "web"), ("tier", "front")],
            "Burstable",
        );
        let cases = [
            ("app=web", "", true),
            ("app==web", "", true),
            ("app!=web", "", false),
            ("app", "", true),
            ("!app", "", false),
            ("missing", "", false),
            ("!missing", "", true),
            ("app=web,tier=back", "", false),
            ("", "spec.nodeName=node-1", true),
            ("", "spec.nodeName=node-2", false),
            ("", "spec.nodeName!=node-2,metadata.namespace=apps", true),
            ("", "spec.hostNetwork=false", false),
            ("", "spec.hostNetwork=", true),
        ];
        for (labels, fields, want) in cases {
            let mut q = BTreeMap::new();
            q.insert("labelSelector".to_string(), labels.to_string());
            q.insert("fieldSelector".to_string(), fields.to_string());
            let f = parse_filter(Resource::Pods, &q).expect("selector parses");
            assert_eq!(f.matches(&pod), want, "labels {labels:?} fields {fields:?}");
        }
    }

    #[test]
    fn bad_selectors_are_refused() {
        for (key, value) in [
            ("fieldSelector", "spec.containers=x"),
            ("fieldSelector", "spec.nodeName"),
            ("labelSelector", "env in (a,b)"),
        ] {
            let q = BTreeMap::from([(key.to_string(), value.to_string())]);
            assert!(parse_filter(Resource::Pods, &q).is_err(), "{key}={value}");
        }
    }

    #[test]
    fn query_decoding() {
        let q =
            parse_query("&labelSelector=egress-redirector.io%2Fenabled%3Dtrue&watch=true&x=a+b");
        assert_eq!(q["labelSelector"], "egress-redirector.io/enabled=true");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "a b");
    }
}
