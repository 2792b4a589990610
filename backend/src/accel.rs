//! Which accelerator QEMU should use. KVM only where the CPU has hardware virtualization:
//! a /dev/kvm backed by PVM (software virtualization, as on this project's build machines)
//! cannot run an unmodified guest kernel's userspace, so it counts as absent.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// True when /dev/kvm is usable and the CPU advertises VMX or SVM.
pub fn hardware_virtualization() -> bool {
    let kvm_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    kvm_ok && cpu_flags_have_virt(&cpuinfo)
}

fn cpu_flags_have_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// `SUPERMACHINE_ACCEL=kvm|tcg` overrides detection.
pub fn detect() -> Accel {
    match std::env::var("SUPERMACHINE_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ if hardware_virtualization() => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parsing() {
        assert!(cpu_flags_have_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_flags_have_virt("flags\t\t: fpu svm\n"));
        assert!(!cpu_flags_have_virt("flags\t\t: fpu hypervisor vmxx\n"));
        assert!(!cpu_flags_have_virt("model name: vmx\n"));
    }
}
