//! Finding the guest kernel and the guest init binary.

use std::path::{Path, PathBuf};

use crate::Error;

/// The kernel: `explicit`, else `$SUPERMACHINE_KERNEL`, else the one kernel-config/build.sh
/// cached last (`<cache>/kernel/current/vmlinux`).
pub fn find_kernel(explicit: Option<&Path>, cache_root: &Path) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = if let Some(p) = explicit {
        vec![p.to_path_buf()]
    } else if let Some(p) = std::env::var_os("SUPERMACHINE_KERNEL") {
        vec![PathBuf::from(p)]
    } else {
        vec![cache_root.join("kernel/current/vmlinux")]
    };
    first_file(&candidates).ok_or_else(|| Error::Assets {
        what: "guest kernel".into(),
        looked: list(&candidates),
        hint: "build it with kernel-config/build.sh or pass --kernel / SUPERMACHINE_KERNEL".into(),
    })
}

/// The init binary: `explicit`, else `$SUPERMACHINE_INIT`, else next to the running
/// executable, else where `scripts/build-guest.sh` puts it in the cargo target dir.
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else if let Some(p) = std::env::var_os("SUPERMACHINE_INIT") {
        candidates.push(PathBuf::from(p));
    } else if let Ok(exe) = std::env::current_exe() {
        let static_rel = "x86_64-unknown-linux-gnu/release/supermachine-init";
        let exe_dir = exe.parent().map(Path::to_path_buf);
        // target/{debug,release}[/deps] -> target/x86_64-unknown-linux-gnu/release
        let mut dir = exe_dir.clone();
        for _ in 0..3 {
            if let Some(d) = dir.as_ref().and_then(|d| d.parent()) {
                candidates.push(d.join(static_rel));
                dir = Some(d.to_path_buf());
            }
        }
        if let Some(d) = &exe_dir {
            candidates.push(d.join("supermachine-init"));
        }
    }
    // A dynamically linked init (a plain `cargo build --workspace`) cannot run in the guest.
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .cloned()
        .ok_or_else(|| Error::Assets {
            what: "guest init (supermachine-init)".into(),
            looked: format!("{} (a static build is needed)", list(&candidates)),
            hint: "build it with scripts/build-guest.sh or set SUPERMACHINE_INIT".into(),
        })
}

/// True for an ELF file without a PT_INTERP program header (no dynamic loader needed).
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| u32_at(phoff + i * phentsize) != Some(PT_INTERP))
}

/// The agent binary, next to the init binary (scripts/build-guest.sh builds both);
/// `$SUPERMACHINE_SHIM` overrides. `None`: the VM runs without an agent.
pub fn find_shim(init: &Path) -> Option<PathBuf> {
    let p = std::env::var_os("SUPERMACHINE_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| init.with_file_name("supermachine-shim"));
    (p.is_file() && is_static_elf(&p)).then_some(p)
}

fn first_file(c: &[PathBuf]) -> Option<PathBuf> {
    c.iter().find(|p| p.is_file()).cloned()
}

fn list(c: &[PathBuf]) -> String {
    c.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
