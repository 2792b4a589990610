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
        Cgroup::create_in(PARENT, true, name, limits)
    }

    /// Creates `PARENT/NAME` in a group delegated to this (non-root) user, which must
    /// exist, and writes the limits: nothing above it is touched.
    pub fn create_delegated(
        parent: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, JailError> {
        Cgroup::create_in(parent, false, name, limits)
    }

    /// `own_parent`: the parent is ours to create and to enable controllers above.
    fn create_in(
        parent: &str,
        own_parent: bool,
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, JailError> {
        if let Some(root) = unified_root() {
            let parent = root.join(parent);
            let controllers = if limits.cpus.is_some() {
                "+memory +pids +cpu"
            } else {
                "+memory +pids"
            };
            if own_parent {
                write(&root.join("cgroup.subtree_control"), controllers)?;
                mkdir(&parent)?;
            }
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
            if own_parent {
                mkdir(&v1(c).join(parent))?;
            }
            let dir = v1(c).join(parent).join(name);
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

/// `serve --user`: creates `supermachine/NAME`, delegated to `uid`:`gid` (the directory and
/// the files that create groups and move processes are theirs), for the VMs' groups
/// ([`Cgroup::create_delegated`]); on v2 this process moves into `NAME/router` first (the
/// kernel lets a process move others only within a subtree it is in). Returns the group's
/// name. Root only.
pub fn delegate(name: &str, uid: u32, gid: u32, cpu: bool) -> Result<String, JailError> {
    let group = format!("{PARENT}/{name}");
    let own = |p: &Path| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| JailError::Cgroup {
            path: p.to_path_buf(),
            detail: format!("handing it to {uid}:{gid}: {e}"),
        })
    };
    if let Some(root) = unified_root() {
        let controllers = if cpu {
            "+memory +pids +cpu"
        } else {
            "+memory +pids"
        };
        write(&root.join("cgroup.subtree_control"), controllers)?;
        mkdir(&root.join(PARENT))?;
        write(
            &root.join(PARENT).join("cgroup.subtree_control"),
            controllers,
        )?;
        let dir = root.join(&group);
        let leaf = dir.join("router");
        mkdir(&dir)?;
        mkdir(&leaf)?;
        // Out of `dir` before its controllers go on (a group with processes may not).
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(&dir.join("cgroup.subtree_control"), controllers)?;
        for d in [&dir, &leaf] {
            for f in [
                "",
                "cgroup.procs",
                "cgroup.subtree_control",
                "cgroup.threads",
            ] {
                own(&d.join(f))?;
            }
        }
        return Ok(group);
    }
    let mut controllers = vec!["memory", "pids"];
    if cpu {
        controllers.push("cpu");
    }
    for c in controllers {
        let base = Path::new(ROOT).join(c);
        mkdir(&base.join(PARENT))?;
        let dir = base.join(&group);
        mkdir(&dir)?;
        for f in ["", "tasks", "cgroup.procs"] {
            own(&dir.join(f))?;
        }
    }
    Ok(group)
}

/// Removes what routers that are gone delegated (`supermachine/router-PID` for a PID no
/// longer alive, and the groups in it): a router that gave up root cannot remove its own.
/// Best effort; root only.
pub fn remove_stale_delegations() {
    let mut parents = Vec::new();
    if let Some(root) = unified_root() {
        parents.push(root.join(PARENT));
    } else {
        for c in ["memory", "pids", "cpu"] {
            parents.push(Path::new(ROOT).join(c).join(PARENT));
        }
    }
    for parent in parents {
        let Ok(rd) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("router-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Ok(children) = std::fs::read_dir(e.path()) {
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// CPUs -> microseconds per 100 ms period.
fn quota(cpus: f64) -> u64 {
    ((cpus * 100_000.0) as u64).max(1000)
}
