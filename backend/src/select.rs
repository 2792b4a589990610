//! Which backend runs a VM: `--backend auto|kvm|qemu`. `auto` takes our own VMM (kvm) only
//! where /dev/kvm has hardware virtualization (VMX/SVM) and QEMU everywhere else; the
//! choice comes with a sentence saying why, for the user.

use std::fmt;
use std::str::FromStr;

use crate::{accel, kvm::KvmBackend, qemu::QemuBackend, Backend, BackendError, BackendKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Kvm,
    Qemu,
}

impl BackendChoice {
    /// `SUPERMACHINE_BACKEND` if set (and valid), else `Auto`.
    pub fn from_env() -> Self {
        std::env::var("SUPERMACHINE_BACKEND")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "qemu" => Ok(Self::Qemu),
            other => Err(format!("unknown backend {other:?} (auto, kvm or qemu)")),
        }
    }
}

/// The explicit choice of a decided backend (so a later `select` cannot decide otherwise).
impl From<BackendKind> for BackendChoice {
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Kvm => Self::Kvm,
            BackendKind::Qemu => Self::Qemu,
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        })
    }
}

/// A backend ready to boot, with a name for reports and the reason it was picked.
pub struct Selected {
    pub backend: Box<dyn Backend>,
    /// e.g. `kvm (supermachine-vmm)`, `qemu (tcg)`.
    pub name: String,
    /// Why: e.g. `auto: /dev/kvm has no hardware virtualization (VMX/SVM)`.
    pub reason: String,
}

impl Selected {
    /// The backend of `kind`, picked for `reason`.
    fn of(kind: BackendKind, reason: &str) -> Self {
        let (backend, name): (Box<dyn Backend>, String) = match kind {
            BackendKind::Kvm => (Box::new(KvmBackend::new()), "kvm (supermachine-vmm)".into()),
            BackendKind::Qemu => {
                let q = QemuBackend::new();
                let name = format!("qemu ({})", q.accel());
                (Box::new(q), name)
            }
        };
        Self {
            backend,
            name,
            reason: reason.into(),
        }
    }

    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }
}

/// What the host offers, as `select` sees it.
#[derive(Debug, Clone, Copy)]
pub struct HostSupport {
    /// /dev/kvm opens read-write.
    pub kvm_device: bool,
    /// The CPU advertises VMX or SVM.
    pub hardware_virtualization: bool,
}

impl HostSupport {
    pub fn probe() -> Self {
        let kvm_device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Self {
            kvm_device,
            hardware_virtualization: kvm_device && accel::hardware_virtualization(),
        }
    }
}

pub fn select(choice: BackendChoice) -> Result<Selected, BackendError> {
    select_on(choice, HostSupport::probe())
}

/// The decision, separate from probing the host (so every case can be tested).
pub fn select_on(choice: BackendChoice, host: HostSupport) -> Result<Selected, BackendError> {
    use BackendKind::{Kvm, Qemu};
    Ok(match choice {
        BackendChoice::Qemu => Selected::of(Qemu, "--backend qemu"),
        BackendChoice::Kvm if !host.kvm_device => {
            return Err(BackendError::Unavailable(
                "the kvm backend needs /dev/kvm, which cannot be opened read-write here \
                 (use --backend qemu or auto)"
                    .into(),
            ))
        }
        BackendChoice::Kvm if !host.hardware_virtualization => Selected::of(
            Kvm,
            "--backend kvm, although /dev/kvm has no hardware virtualization \
             (VMX/SVM): guest kernel code is emulated and an unmodified guest may \
             not reach userspace",
        ),
        BackendChoice::Kvm => Selected::of(Kvm, "--backend kvm"),
        BackendChoice::Auto if host.hardware_virtualization => {
            Selected::of(Kvm, "auto: /dev/kvm has hardware virtualization")
        }
        BackendChoice::Auto if host.kvm_device => Selected::of(
            Qemu,
            "auto: /dev/kvm has no hardware virtualization (VMX/SVM)",
        ),
        BackendChoice::Auto => Selected::of(Qemu, "auto: no usable /dev/kvm"),
    })
}

/// The backend that restores a snapshot baked by `kind`.
pub fn for_kind(kind: BackendKind) -> Selected {
    Selected::of(kind, &format!("the snapshot was baked by {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: HostSupport = HostSupport {
        kvm_device: true,
        hardware_virtualization: true,
    };
    const PVM: HostSupport = HostSupport {
        kvm_device: true,
        hardware_virtualization: false,
    };
    const NO_KVM: HostSupport = HostSupport {
        kvm_device: false,
        hardware_virtualization: false,
    };

    #[test]
    fn auto_picks_kvm_only_with_hardware_virtualization_and_says_why() {
        let s = select_on(BackendChoice::Auto, VMX).unwrap();
        assert_eq!(s.kind(), BackendKind::Kvm);
        assert!(
            s.reason.contains("has hardware virtualization"),
            "{}",
            s.reason
        );
        let s = select_on(BackendChoice::Auto, PVM).unwrap();
        assert_eq!(s.kind(), BackendKind::Qemu);
        assert!(
            s.reason.contains("no hardware virtualization"),
            "{}",
            s.reason
        );
        let s = select_on(BackendChoice::Auto, NO_KVM).unwrap();
        assert_eq!(s.kind(), BackendKind::Qemu);
        assert!(s.reason.contains("no usable /dev/kvm"), "{}", s.reason);
    }

    #[test]
    fn explicit_choices_are_obeyed_or_refused_with_the_reason() {
        assert_eq!(
            select_on(BackendChoice::Qemu, VMX).unwrap().kind(),
            BackendKind::Qemu
        );
        let forced = select_on(BackendChoice::Kvm, PVM).unwrap();
        assert_eq!(forced.kind(), BackendKind::Kvm);
        assert!(forced.reason.contains("may not reach userspace"));
        match select_on(BackendChoice::Kvm, NO_KVM) {
            Err(BackendError::Unavailable(m)) => assert!(m.contains("/dev/kvm"), "{m}"),
            other => panic!("expected Unavailable, got {:?}", other.map(|s| s.name)),
        }
        assert_eq!("kvm".parse(), Ok(BackendChoice::Kvm));
        assert!("vmx".parse::<BackendChoice>().is_err());
    }
}
