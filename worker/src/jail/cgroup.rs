//! One cgroup per worker with memory, pids and (optional) cpu limits: cgroup v2 where the
//! unified hierarchy has the memory and pids controllers, else the v1 controller
//! hierarchies (`/sys/fs/cgroup/memory`, `pids`, `cpu`), as mounted on Debian build hosts.

use std::path::{Path, PathBuf};

use super::JailError;

const ROOT: &str = "/sys/fs/cgroup";
/// Our parent group in each hierarchy.
const PARENT: &str = "supermachine";

/// Where limits are written for one worker: one directory on v2, one per controller on v1.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpus: Option<f64>,
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(|e| JailError::Cgroup {
        path: path.to_path_buf(),
        detail: format!("writing {value:?}: {e}"),
    })
}

fn mkdir(path: &Path) -> Result<(), JailError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(JailError::Cgroup {
            path: path.to_path_buf(),
            detail: format!("creating it: {e}"),
        }),
    }
}

/// The v2 mount whose root offers memory and pids, if any.
fn unified_root() -> Option<PathBuf> {
    for root in [PathBuf::from(ROOT), Path::new(ROOT).join("unified")] {
        let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
            continue;
        };
        let has = |name: &str| c.split_whitespace().any(|w| w == name);
        if has("memory") && has("pids") {
            return Some(root);
        }
    }
    None
}

impl Cgroup {
    /// Creates `supermachine/NAME` and writes the limits (before any process joins).
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, JailError> {
        if let Some(root) = unified_root() {
            let parent = root.join(PARENT);
            let controllers = if limits.cpus.is_some() {
                "+memory +pids +cpu"
            } else {
                "+memory +pids"
            };
            write(&root.join("cgroup.subtree_control"), controllers)?;
            mkdir(&parent)?;
            write(&parent.join("cgroup.subtree_control"), controllers)?;
            let dir = parent.join(name);
            mkdir(&dir)?;
            let cg = Cgroup {
                dirs: vec![dir.clone()],
            };
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            // No swap: a VM over its limit is killed, not slowed to a crawl.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
            if let Some(c) = limits.cpus {
                write(&dir.join("cpu.max"), &format!("{} 100000", quota(c)))?;
            }
            return Ok(cg);
        }
        let v1 = |controller: &str| Path::new(ROOT).join(controller);
        for c in ["memory", "pids"] {
            if !v1(c).join("cgroup.procs").is_file() {
                return Err(JailError::Cgroup {
                    path: v1(c),
                    detail: "neither cgroup v2 with the memory and pids controllers nor the \
                             v1 controller is mounted"
                        .into(),
                });
            }
        }
        let mut cg = Cgroup { dirs: Vec::new() };
        let mut controllers = vec!["memory", "pids"];
        if limits.cpus.is_some() {
            controllers.push("cpu");
        }
        for c in controllers {
            mkdir(&v1(c).join(PARENT))?;
            let dir = v1(c).join(PARENT).join(name);
            mkdir(&dir)?;
            cg.dirs.push(dir.clone());
            match c {
                "memory" => {
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    let _ = std::fs::write(
                        dir.join("memory.memsw.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    );
                }
                "pids" => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                _ => {
                    write(&dir.join("cpu.cfs_period_us"), "100000")?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &quota(limits.cpus.unwrap_or(1.0)).to_string(),
                    )?;
                }
            }
        }
        Ok(cg)
    }

    /// Moves process `pid` (and its future children) into the group.
    pub fn attach(&self, pid: u32) -> Result<(), JailError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the group once its processes are gone (they may take a moment to be reaped
    /// after the worker died).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..100 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// CPUs -> microseconds per 100 ms period.
fn quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0) as u64).max(1000)
}
