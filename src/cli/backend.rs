//! `--backend auto|kvm|qemu`, shared by the commands that boot or bake a VM, and the line
//! that tells the user which backend was picked and why.

use clap::Args;
use supermachine_backend::{select, BackendChoice};

#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Which VMM runs the guest: kvm (our own VMM; needs /dev/kvm), qemu, or auto (kvm only
    /// where /dev/kvm has hardware virtualization, VMX/SVM; qemu elsewhere). A snapshot is
    /// always restored by the backend that baked it.
    #[arg(
        long,
        value_name = "auto|kvm|qemu",
        env = "SUPERMACHINE_BACKEND",
        default_value = "auto"
    )]
    pub backend: BackendChoice,
}

impl BackendArgs {
    /// Decides, says on stderr what was picked and why, and returns the decision as an
    /// explicit choice (so the library does not decide again, differently).
    pub fn resolve(&self) -> Result<BackendChoice, String> {
        let s = select::select(self.backend).map_err(|e| e.to_string())?;
        eprintln!("supermachine: backend {} [{}]", s.name, s.reason);
        Ok(s.kind().into())
    }
}
