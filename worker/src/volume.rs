//! Volumes: host directories a VM sees at a path of its own (`-v HOST:GUEST[:ro|rw]`).
//! Each is bound to one of the VM's filesystem slots (`supermachine_backend::VolumeSlot`):
//! at boot for a booted VM, at restore for a restored one (its snapshot was baked with the
//! slots unbound), and init mounts it. See docs/ARCHITECTURE.md, "Volumes".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use supermachine_backend::VolumeSlot;
use supermachine_protocol::VolumeMount;

/// Whether the guest may write to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// One host directory shown at `guest` inside the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Absolute, symlinks resolved ([`Volume::new`]).
    pub host: PathBuf,
    pub guest: String,
    pub access: Access,
}

/// Guest paths a volume may not cover: the kernel's file systems, and the root itself.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev"];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("volume {spec:?}: expected HOST:GUEST[:ro|rw]")]
    Syntax { spec: String },
    #[error("volume {spec:?}: mode {mode:?} is neither ro nor rw")]
    Mode { spec: String, mode: String },
    #[error("volume host directory {path}: {reason}")]
    Host { path: PathBuf, reason: String },
    #[error("volume guest path {path:?}: {reason}")]
    Guest { path: String, reason: String },
    #[error("{count} volumes asked for; this snapshot's VM has {slots} volume slots ({backend} backend)")]
    TooMany {
        count: usize,
        slots: usize,
        backend: String,
    },
}

impl Volume {
    /// A volume of the directory `host` at `guest`; checks both (see [`VolumeError`]).
    pub fn new(host: impl AsRef<Path>, guest: &str, access: Access) -> Result<Volume, VolumeError> {
        let given = host.as_ref();
        let host = std::fs::canonicalize(given).map_err(|e| VolumeError::Host {
            path: given.to_path_buf(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist (a volume's directory is not created for you)".into()
            } else {
                e.to_string()
            },
        })?;
        if !host.is_dir() {
            return Err(VolumeError::Host {
                path: given.to_path_buf(),
                reason: "is not a directory".into(),
            });
        }
        let guest = check_guest_path(guest)?;
        Ok(Volume {
            host,
            guest,
            access,
        })
    }

    /// Parses `HOST:GUEST[:ro|rw]` (docker's `-v` for bind mounts; a relative HOST is taken
    /// from the current directory).
    pub fn parse(spec: &str) -> Result<Volume, VolumeError> {
        let syntax = || VolumeError::Syntax { spec: spec.into() };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host, guest, access) = match parts.as_slice() {
            [h, g] => (*h, *g, Access::ReadWrite),
            [h, g, "ro"] => (*h, *g, Access::ReadOnly),
            [h, g, "rw"] => (*h, *g, Access::ReadWrite),
            [_, _, mode] => {
                return Err(VolumeError::Mode {
                    spec: spec.into(),
                    mode: (*mode).into(),
                })
            }
            _ => return Err(syntax()),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(syntax());
        }
        Volume::new(host, guest, access)
    }

    pub fn read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }
}

/// `p` normalised (no trailing or double `/`), or why it cannot be a volume's guest path.
fn check_guest_path(p: &str) -> Result<String, VolumeError> {
    let bad = |reason: &str| VolumeError::Guest {
        path: p.into(),
        reason: reason.into(),
    };
    if !p.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad("cannot be the root"));
    }
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad("must not contain . or .."));
    }
    let norm = format!("/{}", parts.join("/"));
    if let Some(r) = RESERVED
        .iter()
        .find(|r| norm == **r || norm.starts_with(&format!("{r}/")))
    {
        return Err(bad(&format!("{r} is the kernel's, not the image's")));
    }
    Ok(norm)
}

/// Checks a VM's volumes together: no guest path twice, no more than `slots`.
pub fn check_all(volumes: &[Volume], slots: usize, backend: &str) -> Result<(), VolumeError> {
    if volumes.len() > slots {
        return Err(VolumeError::TooMany {
            count: volumes.len(),
            slots,
            backend: backend.into(),
        });
    }
    for (i, v) in volumes.iter().enumerate() {
        if volumes[..i].iter().any(|o| o.guest == v.guest) {
            return Err(VolumeError::Guest {
                path: v.guest.clone(),
                reason: "given to two volumes".into(),
            });
        }
    }
    Ok(())
}

/// The backend's slots: the volumes bound in order, the rest (up to `slots`) unbound.
pub fn slots(volumes: &[Volume], slots: usize) -> Vec<VolumeSlot> {
    let mut out: Vec<VolumeSlot> = volumes
        .iter()
        .map(|v| VolumeSlot {
            host: Some(v.host.clone()),
            read_only: v.read_only(),
        })
        .collect();
    out.resize(slots.max(volumes.len()), VolumeSlot::default());
    out
}

/// What init mounts: slot N at volume N's guest path.
pub fn mounts(volumes: &[Volume]) -> Vec<VolumeMount> {
    volumes
        .iter()
        .enumerate()
        .map(|(i, v)| VolumeMount {
            slot: i as u32,
            guest_path: v.guest.clone(),
            read_only: v.read_only(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_like_dockers_bind_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let v = Volume::parse(&format!("{d}:/data")).unwrap();
        assert_eq!(v.guest, "/data");
        assert_eq!(v.access, Access::ReadWrite);
        assert_eq!(v.host, std::fs::canonicalize(dir.path()).unwrap());
        let v = Volume::parse(&format!("{d}://srv//x/:ro")).unwrap();
        assert_eq!((v.guest.as_str(), v.access), ("/srv/x", Access::ReadOnly));
        assert!(matches!(
            Volume::parse(&format!("{d}:/data:rx")),
            Err(VolumeError::Mode { .. })
        ));
        for bad in ["nocolon", ":/data", "/x:", "a:b:c:d"] {
            assert!(
                matches!(Volume::parse(bad), Err(VolumeError::Syntax { .. })),
                "{bad}"
            );
        }
        let missing = Volume::parse("/no/such/dir:/data").unwrap_err().to_string();
        assert!(missing.contains("/no/such/dir") && missing.contains("does not exist"));
        for g in ["data", "/", "/a/../b", "/proc", "/dev/x", "/sys"] {
            assert!(
                matches!(
                    Volume::parse(&format!("{d}:{g}")),
                    Err(VolumeError::Guest { .. })
                ),
                "{g}"
            );
        }
    }

    #[test]
    fn a_vm_gets_at_most_its_slots_and_each_guest_path_once() {
        let dir = tempfile::tempdir().unwrap();
        let v = |g: &str| Volume::new(dir.path(), g, Access::ReadOnly).unwrap();
        assert!(check_all(&[v("/a"), v("/b")], 4, "qemu").is_ok());
        assert!(matches!(
            check_all(&[v("/a"), v("/a")], 4, "qemu"),
            Err(VolumeError::Guest { .. })
        ));
        let e = check_all(&[v("/a")], 0, "kvm").unwrap_err().to_string();
        assert!(e.contains("0 volume slots (kvm"), "{e}");
        let s = slots(&[v("/a")], 3);
        assert_eq!(s.len(), 3);
        assert!(s[0].host.is_some() && s[0].read_only && s[1].host.is_none());
        assert_eq!(mounts(&[v("/a"), v("/b")])[1].tag(), "smvol1");
    }
}
