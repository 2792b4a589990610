//! Ending the VM. There is no ACPI, so power-off only halts; the kernel is booted with
//! `reboot=t` and we ask for a reboot, which the backend treats as the VM's exit.

use nix::sys::reboot::{reboot, RebootMode};

pub fn off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; PID 1 must not exit, so wait to be killed.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
