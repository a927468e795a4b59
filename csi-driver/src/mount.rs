//! Filesystems and mounts on the node: what is mounted where
//! (/proc/self/mountinfo), probing and formatting a device, mounting,
//! bind mounts, unmounting, growing a filesystem and its usage.

use std::path::{Path, PathBuf};

use crate::command::{self, CommandError};

#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub source: String,
    pub fs_type: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = (bytes[i] == b'\\' && i + 3 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match code {
            Some(code) => {
                out.push(code);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(separator + 1)?.to_string(),
                source: unescape(fields.get(separator + 2)?),
            })
        })
        .collect()
}

pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The newest mount at `path`, if something is mounted there.
pub fn mounted_at(path: &Path) -> std::io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    Ok(mounted_at(path)?.is_some())
}

/// What blkid finds at the start of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Contents {
    /// Nothing blkid knows: the only state in which a device may be formatted.
    Blank,
    Filesystem(String),
    /// A partition table and no filesystem: someone's data, never formatted over.
    PartitionTable(String),
}

/// Probes a device (or an image file) with `blkid -p`, as Kubernetes'
/// mount-utils does before it formats: a filesystem or a partition table
/// means the device is not blank.
pub async fn probe(device: &Path) -> Result<Contents, CommandError> {
    let device = device.to_string_lossy();
    let args = ["-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", &device];
    let out = command::output("blkid", &args).await?;
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |name: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_string)
            };
            Ok(match (field("TYPE"), field("PTTYPE")) {
                (Some(fs), _) => Contents::Filesystem(fs),
                (None, Some(table)) => Contents::PartitionTable(table),
                (None, None) => Contents::Blank,
            })
        }
        // blkid's "nothing found".
        Some(2) => Ok(Contents::Blank),
        _ => Err(command::failed("blkid", &args, &out)),
    }
}

pub async fn format(device: &Path, fs_type: &str) -> Result<(), CommandError> {
    let device = device.to_string_lossy();
    // Discarding a fresh thin volume only sends TRIMs for blocks that hold nothing.
    match fs_type {
        "xfs" => command::run("mkfs.xfs", &["-q", "-K", &device]).await?,
        _ => command::run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &device]).await?,
    };
    Ok(())
}

pub async fn mount(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: &[String],
) -> Result<(), CommandError> {
    let mut args = vec!["-t".to_string(), fs_type.to_string()];
    if !flags.is_empty() {
        args.push("-o".into());
        args.push(flags.join(","));
    }
    args.push(device.to_string_lossy().into());
    args.push(target.to_string_lossy().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    command::run("mount", &refs).await.map(|_| ())
}

pub async fn bind_mount(source: &Path, target: &Path, readonly: bool) -> Result<(), CommandError> {
    let source = source.to_string_lossy();
    let target = target.to_string_lossy();
    command::run("mount", &["--bind", &source, &target]).await?;
    if readonly {
        // A bind mount takes ro only on a remount.
        command::run("mount", &["-o", "remount,bind,ro", &target]).await?;
    }
    Ok(())
}

/// Unmounts whatever is mounted at `path`; nothing mounted is fine.
pub async fn unmount(path: &Path) -> Result<(), CommandError> {
    while is_mount_point(path).unwrap_or(false) {
        command::run("umount", &[&path.to_string_lossy()]).await?;
    }
    Ok(())
}

/// Grows the filesystem to fill its (grown) device.
pub async fn grow_fs(fs_type: &str, device: &Path, mount_point: &Path) -> Result<(), CommandError> {
    match fs_type {
        "xfs" => command::run("xfs_growfs", &[&mount_point.to_string_lossy()]).await?,
        _ => command::run("resize2fs", &[&device.to_string_lossy()]).await?,
    };
    Ok(())
}

/// Grows an unmounted ext4 filesystem that is smaller than its device (the
/// volume was expanded while attached nowhere). Offline growth needs no
/// online-resize privilege (CAP_SYS_RESOURCE) and is checked by e2fsck first.
/// Returns whether it grew.
pub async fn grow_unmounted_ext4(device: &Path) -> Result<bool, CommandError> {
    let dev = device.to_string_lossy();
    let header = command::run("dumpe2fs", &["-h", &dev]).await?;
    let field = |name: &str| -> Option<u64> {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count:"), field("Block size:")) else {
        return Ok(false);
    };
    if blocks * block_size + block_size > device_size(device).await? {
        return Ok(false);
    }
    let args = ["-f", "-p", &*dev];
    let out = command::output("e2fsck", &args).await?;
    // 0: clean, 1: errors corrected; anything else needs a human.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(command::failed("e2fsck", &args, &out));
    }
    command::run("resize2fs", &[&dev]).await?;
    Ok(true)
}

pub async fn device_size(device: &Path) -> Result<u64, CommandError> {
    let out = command::run("blockdev", &["--getsize64", &device.to_string_lossy()]).await?;
    out.parse().map_err(|_| CommandError::Failed {
        command: format!("blockdev --getsize64 {}", device.display()),
        status: "0".into(),
        stderr: format!("unexpected output {out:?}"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn usage(path: &Path) -> std::io::Result<Usage> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and stat a writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fragment = stat.f_frsize as u64;
    Ok(Usage {
        total_bytes: stat.f_blocks as u64 * fragment,
        available_bytes: stat.f_bavail as u64 * fragment,
        used_bytes: (stat.f_blocks as u64).saturating_sub(stat.f_bfree as u64) * fragment,
        total_inodes: stat.f_files as u64,
        free_inodes: stat.f_ffree as u64,
        used_inodes: (stat.f_files as u64).saturating_sub(stat.f_ffree as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image file with `bytes` at its start.
    fn image(dir: &Path, name: &str, start: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut data = vec![0u8; 4 << 20];
        data[..start.len()].copy_from_slice(start);
        std::fs::write(&path, data).unwrap();
        path
    }

    #[tokio::test]
    async fn only_a_device_with_nothing_on_it_is_blank() {
        let dir = tempfile::tempdir().unwrap();
        let blank = image(dir.path(), "blank", &[]);
        assert_eq!(probe(&blank).await.unwrap(), Contents::Blank);

        // An MBR with one Linux partition and no filesystem.
        let mut mbr = vec![0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        let partitioned = image(dir.path(), "partitioned", &mbr);
        assert_eq!(
            probe(&partitioned).await.unwrap(),
            Contents::PartitionTable("dos".into())
        );

        let ext4 = image(dir.path(), "ext4", &[]);
        format(&ext4, "ext4").await.unwrap();
        assert_eq!(
            probe(&ext4).await.unwrap(),
            Contents::Filesystem("ext4".into())
        );
    }

    #[test]
    fn mountinfo_lines_give_mount_point_type_and_source() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:0 / /var/lib/k/staging rw,relatime shared:5 - ext4 /dev/loop0 rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[0].fs_type, "ext3");
        assert_eq!(mounts[1].source, "/dev/loop0");
    }
}
