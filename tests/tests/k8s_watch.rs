//! The Kubernetes watcher against the in-test API stand-in: which pods end up in the desired set, and that faults lose none.
//!
//! Unprivileged: `redirector::k8s::run` runs in-process with a client built from the
//! stand-in's kubeconfig and a temporary directory as cgroup root; the tests read the
//! desired set through the `watch::Receiver` the reconciler would use.
//!
//! Why the stand-in and not the real API server of `k8s_e2e.rs`: these tests inject watch
//! faults at chosen moments (dropped streams, 503s, `410 Gone`, bookmarks on demand), which
//! a real server cannot be told to produce, and they run unprivileged and in-process, with
//! no server binary. The same selection rules are exercised against the real server there.
use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use redirector::{
    k8s::{self, ENABLED_LABEL, K8sError},
    kubelet::{PodUid, QosClass, pod_cgroup_candidates},
    workloads::DesiredSet,
};
use tempfile::TempDir;
use tests::kube_api::{KubeApi, Resource, pod_json};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(30);
const ON: &[(&str, &str)] = &[(ENABLED_LABEL, "true")];
const OPT_OUT: &[(&str, &str)] = &[(ENABLED_LABEL, "false")];

fn uid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-{n:012x}")
}

fn puid(n: u32) -> PodUid {
    PodUid::from_api(&uid(n)).expect("uuid")
}

/// The watcher running against `api`, and every desired set it published.
struct Watching {
    api: KubeApi,
    dir: TempDir,
    rx: watch::Receiver<DesiredSet>,
    seen: Arc<Mutex<Vec<DesiredSet>>>,
    recorder: JoinHandle<()>,
    task: JoinHandle<Result<(), K8sError>>,
}

impl Watching {
    /// Starts the watcher and waits until both its watches are open, i.e. both initial lists
    /// have been applied (the watcher opens a watch only after handing over `InitDone`).
    async fn start(api: KubeApi) -> Watching {
        let w = Watching::spawn(api).await;
        w.api
            .wait_stats("both watches open", |s| {
                s.open(Resource::Namespaces) >= 1 && s.open(Resource::Pods) >= 1
            })
            .await;
        w
    }

    /// Starts the watcher without waiting for anything.
    async fn spawn(api: KubeApi) -> Watching {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = api.kubeconfig(dir.path());
        let client = k8s::client(Some(&kubeconfig))
            .await
            .expect("client from the stand-in's kubeconfig");
        let (tx, rx) = watch::channel(DesiredSet::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = {
            let mut rx = rx.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let value = rx.borrow_and_update().clone();
                    seen.lock().unwrap().push(value);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let root = dir.path().join("cgroup");
        let task = tokio::spawn(k8s::run(
            client,
            NODE.to_owned(),
            root,
            Default::default(),
            tx,
            tokio::sync::watch::channel(Default::default()).0,
        ));
        Watching {
            api,
            dir,
            rx,
            seen,
            recorder,
            task,
        }
    }

    fn cgroup_root(&self) -> std::path::PathBuf {
        self.dir.path().join("cgroup")
    }

    /// Waits (bounded) until the desired set's keys are exactly `want`.
    async fn wait_keys(&mut self, what: &str, want: &[&str]) -> DesiredSet {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        self.wait_for(what, |set| {
            set.keys().cloned().collect::<BTreeSet<_>>() == want
        })
        .await
    }

    async fn wait_for(&mut self, what: &str, pred: impl Fn(&DesiredSet) -> bool) -> DesiredSet {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let current = self.rx.borrow_and_update();
                if pred(&current) {
                    return current.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!(
                    "waiting for {what}: the watcher stopped: {:?}",
                    (&mut self.task).await
                ),
                Err(_) => panic!(
                    "timed out waiting for {what}; last desired set: {:?}; api stats: {:?}",
                    describe(&self.rx.borrow()),
                    self.api.stats()
                ),
            }
        }
    }

    /// Every desired set published so far, once the recorder has caught up with the latest.
    async fn history(&self) -> Vec<DesiredSet> {
        let deadline = Instant::now() + WAIT;
        loop {
            let latest = self.rx.borrow().clone();
            {
                let seen = self.seen.lock().unwrap();
                if seen.last() == Some(&latest) {
                    return seen.clone();
                }
            }
            assert!(Instant::now() < deadline, "the recorder never caught up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that once `uid` appeared, no published set ever lacked it.
    async fn assert_never_lost(&self, uid: &str) {
        let history = self.history().await;
        let first = history
            .iter()
            .position(|s| s.contains_key(uid))
            .unwrap_or_else(|| {
                panic!("{uid} never enabled; history: {:?}", describe_all(&history))
            });
        if let Some(gap) = history[first..].iter().position(|s| !s.contains_key(uid)) {
            panic!(
                "{uid} was dropped at step {} of the published history: {:?}",
                first + gap,
                describe_all(&history)
            );
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
        self.recorder.abort();
    }
}

fn describe(set: &DesiredSet) -> Vec<String> {
    set.values()
        .map(|w| format!("{} ({})", w.label, w.key))
        .collect()
}

fn describe_all(history: &[DesiredSet]) -> Vec<Vec<String>> {
    history.iter().map(describe).collect()
}

#[tokio::test]
async fn labeling_a_namespace_enables_its_pods_on_this_node_only() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", &[]);
    api.create_namespace("other", &[("team", "x")]);
    api.create_pod("apps", "web", &uid(1), NODE, &[("app", "web")], "Burstable");
    api.create_pod("apps", "remote", &uid(2), "node-2", &[], "Burstable");
    api.create_pod("other", "db", &uid(3), NODE, &[], "Burstable");
    let mut w = Watching::start(api).await;
    assert!(w.rx.borrow().is_empty(), "no namespace is labeled yet");

    w.api.label_namespace("apps", ENABLED_LABEL, Some("true"));
    let set = w.wait_keys("apps/web enabled", &[&uid(1)]).await;
    let web = &set[&uid(1)];
    assert_eq!(web.key, uid(1));
    assert_eq!(web.label, "apps/web");
    assert_eq!(
        web.cgroup_candidates,
        pod_cgroup_candidates(&w.cgroup_root(), &puid(1), QosClass::Burstable)
    );

    w.api.label_namespace("other", ENABLED_LABEL, Some("true"));
    w.wait_keys("other/db enabled too", &[&uid(1), &uid(3)])
        .await;

    w.api.label_namespace("apps", ENABLED_LABEL, None);
    w.wait_keys("apps unlabeled", &[&uid(3)]).await;

    w.api.label_namespace("other", ENABLED_LABEL, Some("false"));
    w.wait_keys("other labeled false", &[]).await;

    w.api.label_namespace("apps", ENABLED_LABEL, Some("true"));
    w.wait_keys("apps relabeled", &[&uid(1)]).await;
    w.api.delete_namespace("apps");
    w.wait_keys("apps deleted", &[]).await;
    assert!(
        w.history().await.iter().all(|s| !s.contains_key(&uid(2))),
        "a pod on another node was enabled"
    );
}

/// Audit mode (issue 13, item 6): pods of a namespace labeled `enabled=audit` are in the set,
/// marked audited; relabeling `true` and back switches them in place (same keys, never a set
/// without them in between).
#[tokio::test]
async fn audit_label_audits_and_relabeling_switches_in_place() {
    let api = KubeApi::start().await;
    api.create_namespace("shop", &[(ENABLED_LABEL, "audit")]);
    api.create_namespace("apps", ON);
    api.create_pod("shop", "web", &uid(1), NODE, &[], "Burstable");
    api.create_pod("shop", "out", &uid(2), NODE, OPT_OUT, "Burstable");
    api.create_pod("apps", "api", &uid(3), NODE, &[], "Burstable");
    let mut w = Watching::start(api).await;
    let audited = |set: &DesiredSet| -> Vec<(String, bool)> {
        set.values().map(|w| (w.label.clone(), w.audit)).collect()
    };
    let set = w.wait_keys("initial list", &[&uid(1), &uid(3)]).await;
    assert_eq!(
        audited(&set),
        [
            ("shop/web".to_owned(), true),
            ("apps/api".to_owned(), false)
        ],
        "the opted-out pod stays out of an audit namespace too"
    );
    w.api.label_namespace("shop", ENABLED_LABEL, Some("true"));
    w.wait_for("shop enforced", |s| {
        s.get(&uid(1)).is_some_and(|w| !w.audit)
    })
    .await;
    w.api.label_namespace("shop", ENABLED_LABEL, Some("audit"));
    w.wait_for("shop audited again", |s| {
        s.get(&uid(1)).is_some_and(|w| w.audit)
    })
    .await;
    w.api.label_namespace("shop", ENABLED_LABEL, Some("Audit"));
    w.wait_keys("a value other than true/audit enables nothing", &[&uid(3)])
        .await;
    let history = w.history().await;
    let first = history
        .iter()
        .position(|s| s.contains_key(&uid(1)))
        .expect("shop/web was in a set");
    let last = history
        .iter()
        .rposition(|s| s.contains_key(&uid(1)))
        .expect("shop/web was in a set");
    assert!(
        history[first..=last]
            .iter()
            .all(|s| s.contains_key(&uid(1))),
        "switching modes never dropped the pod: {:?}",
        describe_all(&history)
    );
}

#[tokio::test]
async fn initial_list_applies_every_rule() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    api.create_namespace("plain", &[]);
    api.create_pod("apps", "guaranteed", &uid(1), NODE, &[], "Guaranteed");
    api.create_pod("apps", "besteffort", &uid(2), NODE, &[], "BestEffort");
    api.create_pod("apps", "no-qos", &uid(3), NODE, &[], "");
    api.create_pod("apps", "pending", &uid(4), NODE, &[], "Burstable");
    api.set_pod_phase("apps", "pending", "Pending");
    api.create_pod("apps", "opted-out", &uid(5), NODE, OPT_OUT, "Burstable");
    api.create_pod("apps", "done", &uid(6), NODE, &[], "Burstable");
    api.set_pod_phase("apps", "done", "Succeeded");
    api.create_pod("apps", "crashed", &uid(7), NODE, &[], "Burstable");
    api.set_pod_phase("apps", "crashed", "Failed");
    let mut host = pod_json("apps", "host", &uid(8), NODE, &[], "BestEffort");
    host["spec"]["hostNetwork"] = true.into();
    api.create(host);
    api.create_pod("apps", "elsewhere", &uid(9), "node-2", &[], "Burstable");
    api.create_pod("plain", "unlabeled", &uid(10), NODE, &[], "Burstable");

    let mut w = Watching::spawn(api).await;
    let set = w
        .wait_keys("the eligible pods", &[&uid(1), &uid(2), &uid(3), &uid(4)])
        .await;
    let root = w.cgroup_root();
    for (n, qos) in [
        (1, QosClass::Guaranteed),
        (2, QosClass::BestEffort),
        (3, QosClass::Burstable),
    ] {
        assert_eq!(
            set[&uid(n)].cgroup_candidates,
            pod_cgroup_candidates(&root, &puid(n), qos),
            "{qos}"
        );
    }
    let guaranteed = &set[&uid(1)].cgroup_candidates;
    assert!(guaranteed.contains(&root.join(format!(
        "kubepods.slice/kubepods-pod{}.slice",
        uid(1).replace('-', "_")
    ))));
    assert!(guaranteed.contains(&root.join(format!("kubepods/pod{}", uid(1)))));
    let history = w.history().await;
    assert_eq!(
        history.iter().filter(|s| !s.is_empty()).count(),
        1,
        "one complete set, no partial ones: {:?}",
        describe_all(&history)
    );
}

#[tokio::test]
async fn pod_opt_out_label_excludes_the_pod() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    api.create_pod("apps", "a", &uid(1), NODE, &[], "Burstable");
    api.create_pod("apps", "b", &uid(2), NODE, OPT_OUT, "Burstable");
    let mut w = Watching::start(api).await;
    w.wait_keys("only a", &[&uid(1)]).await;

    w.api.label_pod("apps", "b", ENABLED_LABEL, None);
    w.wait_keys("b no longer opted out", &[&uid(1), &uid(2)])
        .await;
    w.api.label_pod("apps", "a", ENABLED_LABEL, Some("false"));
    w.wait_keys("a opted out", &[&uid(2)]).await;
    w.api.label_pod("apps", "a", ENABLED_LABEL, Some("true"));
    w.wait_keys("a explicitly enabled", &[&uid(1), &uid(2)])
        .await;
}

#[tokio::test]
async fn pods_created_and_deleted_follow() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    let mut w = Watching::start(api).await;

    w.api
        .create_pod("apps", "p1", &uid(1), NODE, &[], "Burstable");
    w.wait_keys("p1 created", &[&uid(1)]).await;
    // Changes the set must ignore, each followed by one it must show, so that the wait proves
    // the ignored one was processed first.
    w.api
        .create_pod("apps", "elsewhere", &uid(9), "node-2", &[], "Burstable");
    let mut host = pod_json("apps", "host", &uid(8), NODE, &[], "BestEffort");
    host["spec"]["hostNetwork"] = true.into();
    w.api.create(host);
    w.api
        .create_pod("apps", "p2", &uid(2), NODE, &[], "BestEffort");
    w.wait_keys("p2 created", &[&uid(1), &uid(2)]).await;

    w.api.mark_pod_terminating("apps", "p1");
    w.api
        .create_pod("apps", "p3", &uid(3), NODE, &[], "Burstable");
    w.wait_keys("p1 terminating but kept", &[&uid(1), &uid(2), &uid(3)])
        .await;
    w.api.delete_pod("apps", "p1");
    w.wait_keys("p1 deleted", &[&uid(2), &uid(3)]).await;

    w.api.set_pod_phase("apps", "p2", "Succeeded");
    w.wait_keys("p2 finished", &[&uid(3)]).await;
    w.assert_never_lost(&uid(3)).await;
    w.api.delete_pod("apps", "p3");
    w.api.delete_pod("apps", "p2");
    w.wait_keys("all deleted", &[]).await;
}

/// Makes the API unreachable with both watches closed, runs `changes`, and brings it back.
async fn outage(w: &Watching, expire: bool, changes: impl FnOnce(&KubeApi)) {
    w.api.set_unavailable(true);
    if expire {
        w.api.expire_resource_versions();
    }
    w.api.drop_watches();
    w.api
        .wait_stats("watches closed and a reconnect refused", |s| {
            s.open(Resource::Namespaces) == 0 && s.open(Resource::Pods) == 0 && s.refused >= 1
        })
        .await;
    changes(&w.api);
    w.api.set_unavailable(false);
}

/// Pods `keep`, `gone`, `later-optout` in enabled `apps`, and `late` in `later` (not enabled).
fn outage_fixture(api: &KubeApi) {
    api.create_namespace("apps", ON);
    api.create_namespace("later", &[]);
    api.create_pod("apps", "keep", &uid(1), NODE, &[], "Burstable");
    api.create_pod("apps", "gone", &uid(2), NODE, &[], "Burstable");
    api.create_pod("apps", "later-optout", &uid(3), NODE, &[], "Burstable");
    api.create_pod("later", "late", &uid(4), NODE, &[], "Burstable");
}

fn outage_changes(api: &KubeApi) {
    api.delete_pod("apps", "gone");
    api.create_pod("apps", "new", &uid(5), NODE, &[], "Burstable");
    api.label_pod("apps", "later-optout", ENABLED_LABEL, Some("false"));
    api.label_namespace("later", ENABLED_LABEL, Some("true"));
}

#[tokio::test]
async fn dropped_watch_resumes_and_picks_up_changes_made_meanwhile() {
    let api = KubeApi::start().await;
    outage_fixture(&api);
    let mut w = Watching::start(api).await;
    w.wait_keys("initial", &[&uid(1), &uid(2), &uid(3)]).await;
    let before = w.api.stats();

    outage(&w, false, outage_changes).await;
    w.wait_keys(
        "changes made during the outage",
        &[&uid(1), &uid(4), &uid(5)],
    )
    .await;

    w.assert_never_lost(&uid(1)).await;
    let after = w.api.stats();
    assert!(
        after.watches(Resource::Pods) > before.watches(Resource::Pods),
        "{after:?}"
    );
    // kube-runtime resumes a cleanly closed watch from its last resource version: the API's
    // history replays what happened meanwhile, with no re-list.
    assert_eq!(
        after.lists(Resource::Pods),
        before.lists(Resource::Pods),
        "{after:?}"
    );
    assert_eq!(after.gone, 0);
}

#[tokio::test]
async fn expired_resource_version_relists_without_losing_enabled_pods() {
    let api = KubeApi::start().await;
    outage_fixture(&api);
    let mut w = Watching::start(api).await;
    w.wait_keys("initial", &[&uid(1), &uid(2), &uid(3)]).await;
    let before = w.api.stats();

    outage(&w, true, outage_changes).await;
    w.wait_keys(
        "changes made during the outage",
        &[&uid(1), &uid(4), &uid(5)],
    )
    .await;

    w.assert_never_lost(&uid(1)).await;
    let after = w.api.stats();
    assert!(
        after.gone >= 2,
        "both watches were told 410 Gone: {after:?}"
    );
    assert!(
        after.lists(Resource::Pods) > before.lists(Resource::Pods),
        "pods re-listed: {after:?}"
    );
    assert!(
        after.lists(Resource::Namespaces) > before.lists(Resource::Namespaces),
        "namespaces re-listed: {after:?}"
    );

    // And the watch keeps working after the re-list.
    w.api
        .create_pod("apps", "after", &uid(6), NODE, &[], "Burstable");
    w.wait_keys(
        "a pod created after the re-list",
        &[&uid(1), &uid(4), &uid(5), &uid(6)],
    )
    .await;
}

#[tokio::test]
async fn bookmarks_change_nothing() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    api.create_pod("apps", "a", &uid(1), NODE, &[], "Burstable");
    let mut w = Watching::start(api).await;
    w.wait_keys("initial", &[&uid(1)]).await;
    let before = w.api.stats();

    for _ in 0..3 {
        w.api.send_bookmarks();
    }
    w.api
        .create_pod("apps", "b", &uid(2), NODE, &[], "Burstable");
    w.wait_keys("b after bookmarks", &[&uid(1), &uid(2)]).await;
    assert_eq!(
        w.api.stats().bookmarks,
        6,
        "three bookmarks on each of the two watches"
    );

    // A watch resumed from a bookmark's version sees only later changes, and nothing is lost.
    w.api.send_bookmarks();
    w.api.drop_watches();
    w.api
        .create_pod("apps", "c", &uid(3), NODE, &[], "Burstable");
    w.wait_keys(
        "c after resuming from a bookmark",
        &[&uid(1), &uid(2), &uid(3)],
    )
    .await;

    let after = w.api.stats();
    assert_eq!(after.lists, before.lists, "no re-list: {after:?}");
    assert_eq!(after.gone, 0);
    w.assert_never_lost(&uid(1)).await;
    w.assert_never_lost(&uid(2)).await;
    let history = w.history().await;
    for pair in history.windows(2) {
        assert_ne!(
            pair[0],
            pair[1],
            "a set was published without a change: {:?}",
            describe_all(&history)
        );
    }
}

#[tokio::test]
async fn api_unavailable_at_start_then_recovers() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    api.create_pod("apps", "a", &uid(1), NODE, &[], "Burstable");
    api.set_unavailable(true);
    let mut w = Watching::spawn(api).await;
    w.api.wait_stats("a refused list", |s| s.refused >= 1).await;
    assert!(w.rx.borrow().is_empty());
    assert!(!w.task.is_finished(), "the watcher must keep retrying");

    w.api.set_unavailable(false);
    w.wait_keys("a after the API came back", &[&uid(1)]).await;
}

#[tokio::test]
async fn stops_when_the_receiver_is_dropped() {
    let api = KubeApi::start().await;
    api.create_namespace("apps", ON);
    let mut w = Watching::start(api).await;
    w.recorder.abort();
    let _ = (&mut w.recorder).await;
    let (_, rx) = watch::channel(DesiredSet::new());
    drop(std::mem::replace(&mut w.rx, rx));
    let result = tokio::time::timeout(WAIT, &mut w.task)
        .await
        .expect("watcher stops");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

#[tokio::test]
async fn kubeconfig_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let Err(err) = k8s::client(Some(&missing)).await else {
        panic!("a missing kubeconfig loaded")
    };
    assert!(matches!(err, K8sError::ReadKubeconfig { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "clusters: [this is not: a kubeconfig").expect("write");
    let Err(err) = k8s::client(Some(Path::new(&garbage))).await else {
        panic!("a garbage kubeconfig loaded")
    };
    assert!(err.to_string().contains("garbage"), "{err}");
}
