//! Snapshot and restore through QEMU's migration machinery. Guest RAM is never in the
//! stream: it lives in a `memory-backend-file` (shared while baking, so the file *is* the
//! RAM; private on restore, so restores copy on write) and the `x-ignore-shared`
//! capability, set by QMP on both sides, leaves it out. QEMU 7.2 has no `file:` URI, so
//! the stream goes through `exec:cat`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::QmpClient;
use crate::BackendError;

/// The migration stream (device and CPU state, RAM excluded), checked by its sha256.
pub const STATE_FILE: &str = "state.bin";
/// Guest RAM, the `memory-backend-file` itself.
pub const MEMORY_FILE: &str = "memory.ram";

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn connect(qmp: &Path) -> Result<QmpClient, BackendError> {
    // QEMU creates the socket early but not instantly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match QmpClient::connect(qmp, Duration::from_secs(30)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn ignore_shared(c: &mut QmpClient) -> Result<(), BackendError> {
    c.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })),
    )?;
    Ok(())
}

/// Polls `query-migrate` until the migration completes.
fn wait_migration(c: &mut QmpClient, what: &str) -> Result<(), BackendError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let st = c.execute("query-migrate", None)?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = st
                    .get("error-desc")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given");
                return Err(BackendError::Qmp(format!("{what} failed: {why}")));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(BackendError::Qmp(format!(
                "{what} did not finish within {MIGRATION_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Pauses the guest and writes its state (not its RAM) to `state`.
pub fn save(qmp: &Path, state: &Path) -> Result<(), BackendError> {
    let mut c = connect(qmp)?;
    c.execute("stop", None)?;
    ignore_shared(&mut c)?;
    let uri = format!("exec:cat > {}", shell_quote(state));
    c.execute("migrate", Some(json!({ "uri": uri })))?;
    wait_migration(&mut c, "saving the VM state")?;
    Ok(())
}

/// Waits until QEMU (`pid`) has no child process left: the `exec:cat > state` of a save.
/// Migration reports "completed" once QEMU has written the stream into the pipe, which can
/// be before `cat` has even created the file (seen on a loaded host).
pub fn wait_for_writer(pid: u32, timeout: Duration) -> Result<(), BackendError> {
    let deadline = Instant::now() + timeout;
    loop {
        let children = !crate::spawn::children_of(pid).is_empty();
        if !children {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BackendError::Snapshot(format!(
                "the state writer of qemu {pid} did not finish within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Opens QMP on a QEMU started with `-incoming defer` and readies it for the stream.
pub fn prepare_incoming(qmp: &Path) -> Result<QmpClient, BackendError> {
    let mut c = connect(qmp)?;
    ignore_shared(&mut c)?;
    Ok(c)
}

/// Loads `state` (RAM excluded) and resumes the guest.
pub fn load(c: &mut QmpClient, state: &Path) -> Result<(), BackendError> {
    let uri = format!("exec:cat {}", shell_quote(state));
    c.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    wait_migration(c, "loading the VM state")?;
    let status = c.execute("query-status", None)?;
    if status.get("running").and_then(|r| r.as_bool()) != Some(true) {
        c.execute("cont", None)?;
    }
    Ok(())
}
