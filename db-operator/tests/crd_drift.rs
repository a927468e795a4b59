//! The committed CRD manifest is what the code generates: a schema change without
//! `cargo run -p strata-operator --bin crdgen` fails here (and so in CI).

use std::path::PathBuf;

use strata_operator::crdgen::{crd_manifest, CRD_MANIFEST_PATH};

#[test]
fn committed_crd_matches_the_generated_one() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_MANIFEST_PATH);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = crd_manifest();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{} differs from the generated CRD from line {} on; \
             run `cargo run -p strata-operator --bin crdgen`",
            CRD_MANIFEST_PATH,
            first_difference + 1
        );
    }
}

#[test]
fn crd_schema_carries_the_server_side_checks() {
    let generated = crd_manifest();
    let crd: serde_json::Value = serde_yaml::from_str(&generated).expect("valid yaml");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["instances"]["minimum"].as_f64(),
        Some(1.0)
    );
    let versions = spec["properties"]["postgresVersion"]["enum"]
        .as_array()
        .expect("postgresVersion has an enum");
    assert!(versions.iter().any(|v| v == 15));
    let pattern = spec["properties"]["storage"]["properties"]["size"]["pattern"]
        .as_str()
        .expect("storage.size has a pattern");
    assert!(!pattern.is_empty());
    let strategies = spec["properties"]["primaryUpdateStrategy"]["enum"]
        .as_array()
        .expect("primaryUpdateStrategy is an enum");
    assert_eq!(strategies.len(), 2);
    assert_eq!(crd["spec"]["group"], "strata.io");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
}
