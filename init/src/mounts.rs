//! Filesystems: the early ones init itself needs, the image's layers under overlayfs, and the
//! kernel filesystems inside the workload's root.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use supermachine_protocol::{LayerMount, VolumeMount};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        source: nix::Error,
    },
    #[error("creating {0}: {1}")]
    Mkdir(String, std::io::Error),
    #[error(
        "layer {serial} ({diff_id}) has no block device: the host attached none with that serial"
    )]
    LayerMissing { serial: String, diff_id: String },
    #[error("volume path {0:?} must be absolute, not /, without ..")]
    VolumePath(String),
    #[error("listing block devices: {0}")]
    Sysfs(std::io::Error),
}

fn mkdir_p(p: &Path) -> Result<(), MountError> {
    fs::create_dir_all(p).map_err(|e| MountError::Mkdir(p.display().to_string(), e))
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    mkdir_p(target)?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| MountError::Mount {
        what: format!("{fstype} {source}"),
        target: target.display().to_string(),
        source: e,
    })
}

/// /proc, /sys and /dev for init itself (the initramfs root is writable already).
pub fn mount_early() -> Result<(), MountError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    do_mount("proc", Path::new("/proc"), "proc", nodev, None)?;
    do_mount("sysfs", Path::new("/sys"), "sysfs", nodev, None)?;
    do_mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Maps virtio-blk serials to device nodes (`smlayer0` -> `/dev/vdc`).
fn block_devices_by_serial() -> Result<Vec<(String, PathBuf)>, MountError> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block").map_err(MountError::Sysfs)? {
        let entry = entry.map_err(MountError::Sysfs)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(serial) = fs::read_to_string(entry.path().join("serial")) {
            out.push((serial.trim().to_string(), PathBuf::from("/dev").join(name)));
        }
    }
    Ok(out)
}

/// Mounts every layer read-only and assembles the overlay at `new_root`.
pub fn mount_layers(layers: &[LayerMount], new_root: &str) -> Result<(), MountError> {
    let devices = block_devices_by_serial()?;
    let mut lowers = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let dev = devices
            .iter()
            .find(|(s, _)| *s == layer.serial)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| MountError::LayerMissing {
                serial: layer.serial.clone(),
                diff_id: layer.diff_id.clone(),
            })?;
        let target = PathBuf::from(format!("/layers/{i}"));
        do_mount(
            &dev.to_string_lossy(),
            &target,
            "squashfs",
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None,
        )?;
        lowers.push(target);
    }
    // The writable upper layer lives in guest RAM.
    do_mount(
        "tmpfs",
        Path::new("/rw"),
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    mkdir_p(Path::new("/rw/upper"))?;
    mkdir_p(Path::new("/rw/work"))?;
    let root = Path::new(new_root);
    if lowers.is_empty() {
        // An image without layers: the upper layer alone is the root.
        do_mount("/rw/upper", root, "none", MsFlags::MS_BIND, None)?;
        return Ok(());
    }
    // overlayfs wants the top layer first.
    let lowerdir = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!("lowerdir={lowerdir},upperdir=/rw/upper,workdir=/rw/work");
    do_mount("overlay", root, "overlay", MsFlags::empty(), Some(&opts))
}

/// Kernel filesystems inside the workload's root, as a container runtime provides them.
pub fn mount_workload_fs(new_root: &str) -> Result<(), MountError> {
    let root = Path::new(new_root);
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    do_mount("proc", &root.join("proc"), "proc", nodev, None)?;
    do_mount(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nodev | MsFlags::MS_RDONLY,
        None,
    )?;
    do_mount(
        "devtmpfs",
        &root.join("dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    do_mount(
        "devpts",
        &root.join("dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    do_mount(
        "shm",
        &root.join("dev/shm"),
        "tmpfs",
        nodev,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// Mounts each volume's 9P export (`smvol<slot>`) at its path inside the workload's root,
/// creating the mount point. Init's mount namespace is the workload's (it is chrooted, not
/// unshared), so a volume mounted after a restore appears under the running workload.
pub fn mount_volumes(volumes: &[VolumeMount], new_root: &str) -> Result<(), MountError> {
    for v in volumes {
        let rel = v.guest_path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            return Err(MountError::VolumePath(v.guest_path.clone()));
        }
        let target = Path::new(new_root).join(rel);
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if v.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // msize: 9p's virtio transport carries at most ~500 KiB per request; 256 KiB keeps
        // large reads and writes to few round trips.
        do_mount(
            &v.tag(),
            &target,
            "9p",
            flags,
            Some("trans=virtio,version=9p2000.L,msize=262144"),
        )?;
    }
    Ok(())
}
