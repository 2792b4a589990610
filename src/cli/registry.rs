//! Names of running VMs (`boot --name`), so `supermachine exec NAME` in another process can
//! find the VM's agent. One JSON file per VM under `$SUPERMACHINE_RUNTIME_DIR`, else
//! `$XDG_RUNTIME_DIR/supermachine`, else `/tmp/supermachine-<uid>`; an entry whose owner
//! process is gone is stale and ignored.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::json;

pub fn dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERMACHINE_RUNTIME_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(p).join("supermachine");
    }
    PathBuf::from(format!("/tmp/supermachine-{}", nix::unistd::getuid()))
}

fn entry(name: &str) -> PathBuf {
    dir().join("vms").join(format!("{name}.json"))
}

pub struct Entry {
    pub agent: SocketAddr,
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub fn lookup(name: &str) -> Result<Entry, String> {
    let path = entry(name);
    let text =
        std::fs::read_to_string(&path).map_err(|_| format!("no running VM named {name:?}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let agent = v["agent"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("{}: no agent address", path.display()))?;
    let pid = v["pid"].as_i64().unwrap_or(0) as i32;
    if !alive(pid) {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "no running VM named {name:?} (its process {pid} is gone)"
        ));
    }
    Ok(Entry { agent })
}

/// Registers `name`; the returned guard removes it.
pub fn register(name: &str, agent: SocketAddr) -> Result<Registration, String> {
    if valid_name(name).is_err() {
        return Err(format!(
            "invalid VM name {name:?}: use letters, digits, '.', '_' and '-'"
        ));
    }
    if lookup(name).is_ok() {
        return Err(format!("a VM named {name:?} is already running"));
    }
    let path = entry(name);
    let parent = path.parent().unwrap_or(std::path::Path::new("/tmp"));
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let body = json!({ "agent": agent.to_string(), "pid": std::process::id() }).to_string();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Registration(path))
}

fn valid_name(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(())
    }
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
