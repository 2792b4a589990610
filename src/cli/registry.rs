//! Names of running VMs and daemons (`boot --name`, `run`), so `exec`, `ps`, `stop` and
//! `logs` in other processes can find them. One JSON file per name under
//! `$SUPERMACHINE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/supermachine`, else
//! `/tmp/supermachine-<uid>`; an entry whose owner process is gone is stale and ignored.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub fn dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERMACHINE_RUNTIME_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(p).join("supermachine");
    }
    PathBuf::from(format!("/tmp/supermachine-{}", nix::unistd::getuid()))
}

fn entry_path(name: &str) -> PathBuf {
    dir().join("vms").join(format!("{name}.json"))
}

/// Where a daemon's output goes (kept after it stops, for `logs`).
pub fn log_path(name: &str) -> PathBuf {
    dir().join("logs").join(format!("{name}.log"))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub pid: i32,
    /// The guest agent (`boot --name`).
    #[serde(default)]
    pub agent: Option<supermachine_backend::AgentEndpoint>,
    /// The daemon's admin endpoint (`run`), which knows its workers' agents.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Where clients connect (`run`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub guest_port: Option<u16>,
    /// What the published port carries: "tcp" or "http" (`run`).
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub started_unix: u64,
}

pub fn alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub fn lookup(name: &str) -> Result<Entry, String> {
    let path = entry_path(name);
    let text =
        std::fs::read_to_string(&path).map_err(|_| format!("no running VM named {name:?}"))?;
    let e: Entry = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !alive(e.pid) {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "no running VM named {name:?} (its process {} is gone)",
            e.pid
        ));
    }
    Ok(e)
}

/// Removes `name`'s entry if its process is gone (lookup does that).
pub fn unregister(name: &str) {
    let _ = lookup(name);
}

/// Every live entry.
pub fn list() -> Vec<Entry> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir().join("vms")) {
        for f in rd.flatten() {
            let name = f
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_string();
            if let Ok(e) = lookup(&name) {
                out.push(e);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
}

/// Registers `entry`; the returned guard removes it.
pub fn register(entry: &Entry) -> Result<Registration, String> {
    let name = &entry.name;
    if !valid_name(name) {
        return Err(format!(
            "invalid name {name:?}: use letters, digits, '.', '_' and '-'"
        ));
    }
    if lookup(name).is_ok() {
        return Err(format!("a VM named {name:?} is already running"));
    }
    let path = entry_path(name);
    let parent = path.parent().unwrap_or(std::path::Path::new("/tmp"));
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let body = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Registration(path))
}

pub struct Registration(PathBuf);

impl Registration {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
