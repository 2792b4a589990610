//! Starting the guest agent (`/shim` in the initramfs) and telling it the workload's pid.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use supermachine_protocol::agent::AGENT_PORT;
use supermachine_protocol::CONFIG_PATH;

const SHIM: &str = "/shim";
/// init's run directory, outside the workload's root; the shim keeps a handle on it.
const RUN_DIR: &str = "/run/supermachine";
/// The descriptor the shim writes one byte to once it listens.
const READY_FD: i32 = 3;

/// Starts the shim and waits until it listens. `Ok(None)`: this initramfs has no shim.
pub fn start(new_root: &str) -> Result<Option<u16>, String> {
    if !Path::new(SHIM).exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(RUN_DIR).map_err(|e| format!("creating {RUN_DIR}: {e}"))?;
    let (rd, wr): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let wr_raw = wr.as_raw_fd();
    let mut cmd = Command::new(SHIM);
    cmd.args([CONFIG_PATH, new_root, &READY_FD.to_string()])
        .stdin(Stdio::null())
        .env_clear();
    if let Ok(console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        if let Ok(c2) = console.try_clone() {
            cmd.stdout(console).stderr(c2);
        }
    }
    // SAFETY: dup2 is async-signal-safe; both descriptors are valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wr_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| format!("starting {SHIM}: {e}"))?;
    drop(wr);
    let mut ready = std::fs::File::from(rd);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(ready.read(&mut b).map(|n| n == 1).unwrap_or(false));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(true) => Ok(Some(AGENT_PORT)),
        Ok(false) => Err("the shim exited before listening (see the console)".into()),
        Err(_) => Err("the shim did not report readiness within 20 s".into()),
    }
}

/// Where the shim finds the pid for `workload_signal`.
pub fn record_workload_pid(pid: i32) {
    let _ = std::fs::write(Path::new(RUN_DIR).join("workload.pid"), pid.to_string());
}
