//! Test-only: a mocked Kubernetes API server and fake instance managers.
//!
//! `ApiServerVerifier` follows kube-rs/controller-rs: a `tower_test::mock::pair`
//! stands in for the API server behind a real `kube::Client`. Rather than script
//! every answer in order, it keeps the objects in memory and answers GET, LIST,
//! POST, PATCH (server-side apply, merge, JSON patch; status subresource) and DELETE
//! like the API server would, recording each request so a test can check what the
//! controller asked for and in which order. Like the real one, it refuses (403)
//! what the operator's ClusterRole in `deploy/operator/rbac.yaml` does not allow,
//! and [`ApiServerVerifier::take_requests`] fails the test on such a request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

use super::instances::{InstanceApi, InstanceTarget};
use super::rbac;
use super::Context;
use crate::instance_api::{
    DemoteReport, InstanceReport, PrimaryAddress, ReplicationSettings, Role,
};
use crate::instance_client::ClientError;

/// One request the controller made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// `plural/name[/subresource]`, e.g. `pods/db-1` or `postgresclusters/db/status`.
    pub target: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `METHOD target`, the shape the tests compare.
    pub fn summary(&self) -> String {
        format!("{} {}", self.method, self.target)
    }
}

type Key = (String, String, String); // plural, namespace, name

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    next_version: u64,
}

pub struct ApiServerVerifier {
    store: Arc<Mutex<Store>>,
    log: Arc<Mutex<Vec<Recorded>>>,
    /// Requests the operator's RBAC does not allow, as `verb group/resource`.
    forbidden: Arc<Mutex<Vec<String>>>,
}

/// The rules of the operator's ClusterRole, read once from deploy/.
fn operator_rules() -> &'static [PolicyRule] {
    static RULES: OnceLock<Vec<PolicyRule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/operator/rbac.yaml");
        let yaml = std::fs::read_to_string(path).expect("deploy/operator/rbac.yaml");
        rbac::cluster_role_rules(&yaml, "strata-operator").expect("the operator's ClusterRole")
    })
}

impl ApiServerVerifier {
    /// A client whose requests this verifier answers, and the verifier.
    pub fn new() -> (Client, Self) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let verifier = Self {
            store: Arc::default(),
            log: Arc::default(),
            forbidden: Arc::default(),
        };
        verifier.serve(handle);
        (client, verifier)
    }

    fn serve(&self, mut handle: Handle<Request<Body>, Response<Body>>) {
        let store = self.store.clone();
        let log = self.log.clone();
        let forbidden = self.forbidden.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("request bodies are JSON")
                };
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let path = parts.uri.path().to_string();
                let query = parts.uri.query().unwrap_or("").to_string();
                let route = Route::parse(&path);
                log.lock().unwrap().push(Recorded {
                    method: parts.method.to_string(),
                    target: route.target(),
                    query: query.clone(),
                    content_type: content_type.clone(),
                    body: body.clone(),
                });
                let verb = rbac::verb_of(
                    parts.method.as_str(),
                    route.name.is_some(),
                    query.split('&').any(|kv| kv == "watch=true"),
                );
                let resource = match &route.subresource {
                    Some(sub) => format!("{}/{sub}", route.plural),
                    None => route.plural.clone(),
                };
                // A server-side apply that creates the object is authorized as
                // a create too, as the API server does.
                let apply_creates = parts.method == http::Method::PATCH
                    && content_type == "application/apply-patch+yaml"
                    && !store.lock().unwrap().holds(&route);
                let allowed = rbac::allows(operator_rules(), &route.group, &resource, verb)
                    && (!apply_creates
                        || rbac::allows(operator_rules(), &route.group, &resource, "create"));
                let (status, answer) = if allowed {
                    store
                        .lock()
                        .unwrap()
                        .answer(&parts.method, &route, &query, &content_type, body)
                } else {
                    let verb = if apply_creates {
                        "create (apply)"
                    } else {
                        verb
                    };
                    let denied = format!("{verb} {}/{resource}", route.group);
                    forbidden.lock().unwrap().push(denied.clone());
                    status_error(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        format!("deploy/operator/rbac.yaml does not allow {denied}"),
                    )
                };
                let response = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                respond.send_response(response);
            }
        });
    }

    /// Puts an object in the store as if it had been created earlier.
    pub fn seed<T: serde::Serialize>(&self, plural: &str, object: &T) {
        let value = serde_json::to_value(object).unwrap();
        let ns = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        self.store
            .lock()
            .unwrap()
            .objects
            .insert((plural.into(), ns, name), value);
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn names(&self, plural: &str) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter(|(p, _, _)| p == plural)
            .map(|(_, _, n)| n.clone())
            .collect()
    }

    /// Every request so far, and forget them. Fails the test if any was one
    /// the operator's RBAC would refuse.
    pub fn take_requests(&self) -> Vec<Recorded> {
        let forbidden = self.forbidden.lock().unwrap().clone();
        assert!(
            forbidden.is_empty(),
            "the controller made requests deploy/operator/rbac.yaml does not allow: {forbidden:?}"
        );
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The reasons of the Events published, in order. A repeat of an Event is a
    /// PATCH of the first one (kube's Recorder counts it in the Event's series).
    pub fn event_reasons(requests: &[Recorded]) -> Vec<String> {
        requests
            .iter()
            .filter(|r| r.target.starts_with("events") && r.method != "GET")
            .map(|r| r.body["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// `METHOD target` of the requests that change something (no GET/LIST, no Events).
    pub fn mutations(requests: &[Recorded]) -> Vec<String> {
        requests
            .iter()
            .filter(|r| r.method != "GET" && !r.target.starts_with("events"))
            .map(Recorded::summary)
            .collect()
    }
}

impl Drop for ApiServerVerifier {
    /// A test that never looks at the requests still fails on a forbidden one.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let forbidden = self.forbidden.lock().unwrap();
            assert!(
                forbidden.is_empty(),
                "the controller made requests deploy/operator/rbac.yaml does not allow: {forbidden:?}"
            );
        }
    }
}

struct Route {
    /// The API group, `""` for the core group.
    group: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Self {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // /api/v1/... or /apis/GROUP/VERSION/...
        let (group, rest) = if segments[0] == "api" {
            (String::new(), &segments[2..])
        } else {
            (segments[1].to_string(), &segments[3..])
        };
        let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        Route {
            group,
            namespace,
            plural: rest[0].to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            subresource: rest.get(2).map(|s| s.to_string()),
        }
    }

    fn target(&self) -> String {
        let mut t = self.plural.clone();
        if let Some(n) = &self.name {
            t = format!("{t}/{n}");
        }
        if let Some(s) = &self.subresource {
            t = format!("{t}/{s}");
        }
        t
    }
}

fn status_error(code: StatusCode, reason: &str, message: String) -> (StatusCode, Value) {
    (
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn matches_selector(object: &Value, query: &str) -> bool {
    let Some(selector) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
    else {
        return true;
    };
    let selector = selector
        .replace("%3D", "=")
        .replace("%2F", "/")
        .replace("%2C", ",");
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => object["metadata"]["labels"][k].as_str() == Some(v),
        None => true,
    })
}

impl Store {
    /// Whether the object a request names exists.
    fn holds(&self, route: &Route) -> bool {
        let Some(name) = &route.name else {
            return false;
        };
        let ns = route.namespace.clone().unwrap_or_default();
        self.objects
            .contains_key(&(route.plural.clone(), ns, name.clone()))
    }

    fn stamp(&mut self, object: &mut Value) {
        self.next_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", self.next_version));
        }
    }

    fn answer(
        &mut self,
        method: &http::Method,
        route: &Route,
        query: &str,
        content_type: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let ns = route.namespace.clone().unwrap_or_default();
        let key = |name: &str| (route.plural.clone(), ns.clone(), name.to_string());
        match (method.as_str(), &route.name) {
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((p, n, _), o)| {
                        *p == route.plural
                            && (*n == ns || ns.is_empty())
                            && matches_selector(o, query)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (
                    StatusCode::OK,
                    json!({"kind": "List", "apiVersion": "v1",
                           "metadata": {"resourceVersion": self.next_version.to_string()},
                           "items": items}),
                )
            }
            ("GET", Some(name)) => match self.objects.get(&key(name)) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            },
            ("POST", None) => {
                let mut object = body;
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if self.objects.contains_key(&key(&name)) {
                    return status_error(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{name} already exists"),
                    );
                }
                object["metadata"]["namespace"] = json!(ns);
                self.stamp(&mut object);
                self.objects.insert(key(&name), object.clone());
                (StatusCode::CREATED, object)
            }
            ("PATCH", Some(name)) => {
                let existing = self.objects.get(&key(name)).cloned();
                let mut object = match (existing, content_type) {
                    (Some(o), _) => o,
                    (None, "application/apply-patch+yaml") if route.subresource.is_none() => {
                        json!({"metadata": {"name": name, "namespace": ns}})
                    }
                    (None, _) => {
                        return status_error(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            format!("{name} not found"),
                        )
                    }
                };
                if route.subresource.as_deref() == Some("status") {
                    object["status"] = body["status"].clone();
                } else {
                    match content_type {
                        "application/json-patch+json" => {
                            let patch: json_patch::Patch =
                                serde_json::from_value(body).expect("a JSON patch");
                            // The API server reads an absent list as null, which
                            // kube's finalizer helper tests for.
                            if object["metadata"].get("finalizers").is_none() {
                                object["metadata"]["finalizers"] = Value::Null;
                            }
                            if let Err(e) = json_patch::patch(&mut object, &patch.0) {
                                return status_error(
                                    StatusCode::UNPROCESSABLE_ENTITY,
                                    "Invalid",
                                    e.to_string(),
                                );
                            }
                        }
                        // Server-side apply of a manifest the operator owns wholly
                        // behaves like a merge for these tests.
                        _ => json_patch::merge(&mut object, &body),
                    }
                }
                self.stamp(&mut object);
                self.objects.insert(key(name), object.clone());
                (StatusCode::OK, object)
            }
            ("DELETE", Some(name)) => match self.objects.remove(&key(name)) {
                Some(o) => (StatusCode::OK, o),
                None => status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            },
            (m, _) => status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{m} {}", route.target()),
            ),
        }
    }
}

/// Instance managers that answer from a table, and remember what they were asked.
#[derive(Default)]
pub struct FakeInstances {
    reports: Mutex<BTreeMap<String, InstanceReport>>,
    calls: Mutex<Vec<String>>,
}

impl FakeInstances {
    pub fn set(&self, report: InstanceReport) {
        self.reports
            .lock()
            .unwrap()
            .insert(report.name.clone(), report);
    }

    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn answer(&self, name: &str) -> Result<InstanceReport, ClientError> {
        self.reports
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| ClientError::Unreachable {
                url: name.into(),
                message: "connection refused".into(),
            })
    }
}

impl InstanceApi for FakeInstances {
    fn status<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move { self.answer(&target.name) })
    }

    fn promote<'a>(
        &'a self,
        target: &'a InstanceTarget,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("promote {}", target.name));
            let mut report = self.answer(&target.name)?;
            report.role = Role::Primary;
            report.current_lsn = report.wal_position();
            report.timeline = report.timeline.map(|t| t + 1);
            self.set(report.clone());
            Ok(report)
        })
    }

    fn follow<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("follow {} {primary}", target.name));
            self.answer(&target.name)
        })
    }

    fn set_replication<'a>(
        &'a self,
        target: &'a InstanceTarget,
        settings: &'a ReplicationSettings,
    ) -> BoxFuture<'a, Result<InstanceReport, ClientError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!(
                "replication {} {} sync={}",
                target.name,
                settings.peers.join(","),
                settings.sync_replicas
            ));
            let mut report = self.answer(&target.name)?;
            report.replication = Some(settings.clone());
            self.set(report.clone());
            Ok(report)
        })
    }

    fn demote<'a>(
        &'a self,
        target: &'a InstanceTarget,
        primary: &'a PrimaryAddress,
    ) -> BoxFuture<'a, Result<DemoteReport, ClientError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("demote {} {primary}", target.name));
            let mut report = self.answer(&target.name)?;
            let final_lsn = report.current_lsn.unwrap_or_default();
            report.role = Role::Replica;
            report.received_lsn = Some(final_lsn);
            report.replayed_lsn = Some(final_lsn);
            report.current_lsn = None;
            self.set(report.clone());
            // The shutdown checkpoint streams to the replicas that are connected.
            let mut reports = self.reports.lock().unwrap();
            for other in reports.values_mut() {
                if other.name != target.name && other.role == Role::Replica && other.ready {
                    let past = crate::lsn::Lsn(final_lsn.0 + 0x28);
                    other.received_lsn = Some(past);
                    other.replayed_lsn = Some(past);
                }
            }
            Ok(DemoteReport { final_lsn, report })
        })
    }
}

/// A context over a mocked API server and fake instance managers.
pub fn test_context() -> (Arc<Context>, ApiServerVerifier, Arc<FakeInstances>) {
    let (client, verifier) = ApiServerVerifier::new();
    let instances = Arc::new(FakeInstances::default());
    let ctx = Arc::new(Context::new(
        client,
        instances.clone(),
        Arc::new(crate::metrics::Metrics::default()),
    ));
    (ctx, verifier, instances)
}
