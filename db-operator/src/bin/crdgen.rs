//! Writes the PostgresCluster CRD to deploy/crds/ (or prints it with `--stdout`).

use std::path::PathBuf;

use anyhow::Context;
use strata_operator::crdgen::{crd_manifest, CRD_MANIFEST_PATH};

fn main() -> anyhow::Result<()> {
    let manifest = crd_manifest();
    if std::env::args().any(|a| a == "--stdout") {
        print!("{manifest}");
        return Ok(());
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_MANIFEST_PATH);
    std::fs::create_dir_all(path.parent().expect("the path has a folder"))?;
    std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
