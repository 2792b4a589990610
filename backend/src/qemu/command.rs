//! The QEMU command line for one VM.

use std::path::Path;

use crate::{accel::Accel, BootSpec};

/// Base kernel command line: console on ttyS0 (quiet), reboot by triple fault so a guest
/// reset ends QEMU (`-no-reboot`), reboot at once on panic so a crashed guest never hangs.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 quiet reboot=t panic=-1 oops=panic i8042.noaux tsc=reliable";

/// A value inside a QEMU `-opt key=value,...` list: a comma is written twice.
fn qemu_opt(v: &str) -> String {
    v.replace(',', ",,")
}

pub struct QemuCommand {
    args: Vec<String>,
}

impl QemuCommand {
    /// `agent`: (host port, guest port) to forward to the guest agent over user-mode networking.
    pub fn new(
        spec: &BootSpec,
        accel: Accel,
        console: &Path,
        channel: &Path,
        qmp: &Path,
        agent: Option<(u16, u16)>,
    ) -> Self {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        match &spec.memory_file {
            Some(mf) => {
                let obj = format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={},share={}",
                    spec.memory_mib,
                    mf.path.display(),
                    if mf.shared { "on" } else { "off" }
                );
                push(&[
                    "-object",
                    &obj,
                    "-M",
                    "microvm,acpi=off,rtc=on,memory-backend=ram",
                ]);
            }
            None => push(&["-M", "microvm,acpi=off,rtc=on"]),
        }
        match accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        let mem = format!("{}M", spec.memory_mib);
        let smp = spec.vcpus.to_string();
        push(&["-m", &mem, "-smp", &smp]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        let kernel = spec.kernel.display().to_string();
        let initrd = spec.initramfs.display().to_string();
        let cmdline = spec.cmdline(BASE_CMDLINE);
        push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);
        let console_dev = format!("file,id=console,path={}", console.display());
        push(&["-chardev", &console_dev, "-serial", "chardev:console"]);
        // The control channel: ttyS1 in the guest.
        let channel_dev = format!("socket,id=channel,path={}", channel.display());
        push(&["-chardev", &channel_dev]);
        push(&["-device", "isa-serial,chardev=channel,iobase=0x2f8,irq=3"]);
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-device,rng=rng0"]);
        for (i, d) in spec.disks.iter().enumerate() {
            let drive = format!(
                "file={},if=none,id=disk{i},format=raw,readonly={},cache=unsafe",
                d.path.display(),
                if d.read_only { "on" } else { "off" }
            );
            let dev = format!("virtio-blk-device,drive=disk{i},serial={}", d.serial);
            push(&["-drive", &drive, "-device", &dev]);
        }
        if let Some((host_port, guest_port)) = agent {
            // restrict=on: the guest gets no egress; only the forwarded agent port enters.
            let netdev = format!(
                "user,id=net0,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{host_port}-10.0.2.15:{guest_port}"
            );
            push(&[
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-device,netdev=net0",
            ]);
        }
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
        push(&["-qmp", &qmp_arg]);
        Self { args: a }
    }

    /// One virtio-9p device per slot, mount tag `smvol<N>`, exporting its host directory
    /// (`unbound` for a slot with none). `security_model=none`: files are created as QEMU's
    /// uid (the jail runs it as the volume's owner), so what the guest writes belongs to
    /// the directory's owner on the host; the guest's chown requests are not applied.
    /// `multidevs=remap`: inode numbers stay unique if the directory spans file systems.
    pub fn volumes(mut self, slots: &[crate::VolumeSlot], unbound: &Path) -> Self {
        for (i, slot) in slots.iter().enumerate() {
            let (path, read_only) = match &slot.host {
                Some(p) => (p.as_path(), slot.read_only),
                None => (unbound, true),
            };
            self.args.extend([
                "-fsdev".to_string(),
                format!(
                    "local,id=vol{i},path={},security_model=none,multidevs=remap{}",
                    qemu_opt(&path.display().to_string()),
                    if read_only { ",readonly=on" } else { "" }
                ),
                "-device".to_string(),
                format!(
                    "virtio-9p-device,fsdev=vol{i},mount_tag={}{i}",
                    supermachine_protocol::VOLUME_TAG_PREFIX
                ),
            ]);
        }
        self
    }

    /// Starts QEMU waiting for a migration stream (`migrate-incoming` over QMP).
    pub fn incoming_deferred(mut self) -> Self {
        self.args
            .extend(["-incoming".to_string(), "defer".to_string()]);
        self
    }

    /// Drops to `uid`:`gid` after set-up, under QEMU's seccomp sandbox: no obsolete or
    /// resource-control syscalls. `spawn` stays allowed because the state is read through
    /// `exec:cat` (QEMU 7.2 has no `file:` migration URI); `elevateprivileges` too, because
    /// `-runas` itself calls setuid after the sandbox is in place (and with no capability
    /// left, nothing can elevate afterwards).
    pub fn jailed_as(mut self, uid: u32, gid: u32) -> Self {
        self.args.extend([
            "-runas".to_string(),
            format!("{uid}:{gid}"),
            "-sandbox".to_string(),
            "on,obsolete=deny,resourcecontrol=deny,elevateprivileges=allow".to_string(),
        ]);
        self
    }

    /// QEMU's seccomp sandbox as [`QemuCommand::jailed_as`] sets it, for a QEMU that
    /// starts as the uid it runs as: nothing to elevate to, so that is denied too.
    pub fn sandboxed(mut self) -> Self {
        self.args.extend([
            "-sandbox".to_string(),
            "on,obsolete=deny,resourcecontrol=deny,elevateprivileges=deny".to_string(),
        ]);
        self
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }
}
