//! What the operator's RBAC allows. `deploy/operator/rbac.yaml` holds the
//! ClusterRole; the tests hold the controller to it: the fake API server of
//! the controller's tests refuses any request the role does not allow, and
//! `tests/deploy.rs` checks the watches of [`super::run`] against it.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use serde::Deserialize;

/// The resources [`super::run`] lists and watches in every namespace, as
/// (API group, plural). Keep in step with the `Controller` built there.
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("strata.io", "postgresclusters"),
    ("", "pods"),
    ("", "persistentvolumeclaims"),
    ("", "services"),
];

/// The rules of the ClusterRole named `name` in a multi-document YAML file.
pub fn cluster_role_rules(yaml: &str, name: &str) -> Result<Vec<PolicyRule>, String> {
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document).map_err(|e| e.to_string())?;
        if value["kind"] == "ClusterRole" && value["metadata"]["name"] == name {
            let role: ClusterRole = serde_json::from_value(value).map_err(|e| e.to_string())?;
            return Ok(role.rules.unwrap_or_default());
        }
    }
    Err(format!("no ClusterRole {name}"))
}

/// Whether `rules` allow `verb` on `resource` (a plural, or `plural/subresource`)
/// of API group `group` (`""` for the core group), as Kubernetes' RBAC
/// authorizer decides it (no resourceNames in our rules).
pub fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    let matches = |list: &Option<Vec<String>>, wanted: &str| {
        list.iter()
            .flatten()
            .any(|item| item == "*" || item == wanted)
    };
    rules.iter().any(|rule| {
        rule.resource_names.as_ref().is_none_or(|n| n.is_empty())
            && matches(&rule.api_groups, group)
            && matches(&rule.resources, resource)
            && rule.verbs.iter().any(|v| v == "*" || v == verb)
    })
}

/// The RBAC verb of an API request: its method, whether it names an object,
/// and whether it asks to watch.
pub fn verb_of(method: &str, names_an_object: bool, watch: bool) -> &'static str {
    match (method, names_an_object) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "
apiVersion: v1
kind: ServiceAccount
metadata: {name: op}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: op}
rules:
  - apiGroups: ['']
    resources: [pods]
    verbs: [get, list]
  - apiGroups: [strata.io]
    resources: [postgresclusters/status]
    verbs: [patch]
  - apiGroups: ['']
    resources: [secrets]
    resourceNames: [one]
    verbs: [delete]
";

    #[test]
    fn rules_allow_what_they_name_and_nothing_else() {
        let rules = cluster_role_rules(ROLE, "op").unwrap();
        assert!(allows(&rules, "", "pods", "get"));
        assert!(allows(&rules, "", "pods", "list"));
        assert!(!allows(&rules, "", "pods", "delete"));
        assert!(!allows(&rules, "apps", "pods", "get"), "another group");
        assert!(allows(
            &rules,
            "strata.io",
            "postgresclusters/status",
            "patch"
        ));
        assert!(
            !allows(&rules, "strata.io", "postgresclusters", "patch"),
            "a subresource's rule is not the resource's"
        );
        assert!(
            !allows(&rules, "", "secrets", "delete"),
            "a rule for named objects does not cover the others"
        );
        assert!(cluster_role_rules(ROLE, "other").is_err());
    }

    #[test]
    fn requests_map_to_verbs() {
        assert_eq!(verb_of("GET", true, false), "get");
        assert_eq!(verb_of("GET", false, false), "list");
        assert_eq!(verb_of("GET", false, true), "watch");
        assert_eq!(verb_of("POST", false, false), "create");
        assert_eq!(verb_of("PATCH", true, false), "patch");
        assert_eq!(verb_of("DELETE", true, false), "delete");
    }
}
