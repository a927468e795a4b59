//! What the node plugin attached and mounted for each staged volume, kept in
//! a file per volume under the state directory, so that NodeUnstage, retried
//! calls and a restarted plugin find the devices and processes again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attach::Attachment;

/// How the staged volume is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Access {
    /// A filesystem mounted at the staging path.
    Mount { fs_type: String },
    /// The raw block device.
    Block,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub nbd_uri: String,
    pub attachment: Attachment,
    pub access: Access,
}

pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn open(dir: &Path) -> std::io::Result<StateStore> {
        let dir = dir.join("volumes");
        std::fs::create_dir_all(&dir)?;
        Ok(StateStore { dir })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    pub fn load(&self, volume_id: &str) -> std::io::Result<Option<StagedVolume>> {
        match std::fs::read(self.path(volume_id)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::other(format!(
                    "state file {} is unreadable ({e}); remove it after cleaning up by hand",
                    self.path(volume_id).display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the record atomically and durably: a crash leaves the old
    /// record or the new one.
    pub fn save(&self, volume: &StagedVolume) -> std::io::Result<()> {
        let path = self.path(&volume.volume_id);
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(volume).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    pub fn remove(&self, volume_id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(volume_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
