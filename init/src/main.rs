//! supermachine-init: PID 1 of every supermachine guest.
//!
//! It mounts the image's layers (one squashfs per virtio-blk device) bottom-up under an
//! overlayfs with a tmpfs upper, starts the workload chrooted into the merged root with the
//! image's environment, working directory and user, forwards signals, reaps zombies, streams
//! the workload's output and exit status to the host over the control channel, and then
//! powers the VM off. It never returns: a PID 1 that exits panics the kernel.

mod channel;
mod mounts;
mod net;
mod power;
mod shim;
mod workload;

use supermachine_init::user;

use std::time::Duration;

use supermachine_protocol::{GuestEvent, RunConfig, CONFIG_PATH};

use channel::Channel;

/// Where the image's merged root is assembled.
const NEW_ROOT: &str = "/newroot";

fn main() {
    if let Err(e) = mounts::mount_early() {
        console(&format!("supermachine-init: early mounts failed: {e}"));
    }
    let channel = match Channel::open() {
        Ok(c) => c,
        Err(e) => {
            console(&format!("supermachine-init: no control channel: {e}"));
            power::off();
        }
    };
    channel.send(&GuestEvent::InitStarted {
        uptime_ms: uptime_ms(),
    });
    match channel.reader() {
        Ok(r) => {
            let c = channel.clone();
            std::thread::spawn(move || follow_host(r, c));
        }
        Err(e) => console(&format!(
            "supermachine-init: no reader on the control channel: {e}"
        )),
    }

    match run(&channel) {
        Ok(status) => {
            channel.send(&GuestEvent::Exited {
                status,
                uptime_ms: uptime_ms(),
            });
        }
        Err(message) => {
            console(&format!("supermachine-init: {message}"));
            channel.send(&GuestEvent::Fatal { message });
        }
    }
    channel.drain();
    power::off();
}

fn run(channel: &Channel) -> Result<supermachine_protocol::ExitStatus, String> {
    let raw = std::fs::read(CONFIG_PATH).map_err(|e| format!("reading {CONFIG_PATH}: {e}"))?;
    let config = RunConfig::from_json(&raw).map_err(|e| format!("parsing {CONFIG_PATH}: {e}"))?;
    if config.argv.is_empty() {
        return Err("run configuration has an empty argv".into());
    }

    mounts::mount_layers(&config.layers, NEW_ROOT).map_err(|e| e.to_string())?;
    mounts::mount_workload_fs(NEW_ROOT).map_err(|e| e.to_string())?;
    mounts::mount_volumes(&config.volumes, NEW_ROOT).map_err(|e| e.to_string())?;
    if let Err(e) = net::set_hostname(&config.hostname, NEW_ROOT) {
        console(&format!("supermachine-init: hostname: {e}"));
    }
    if let Err(e) = net::loopback_up() {
        console(&format!("supermachine-init: bringing up lo: {e}"));
    }
    if let Err(e) = net::eth0_up() {
        console(&format!("supermachine-init: configuring eth0: {e}"));
    }
    match shim::start(NEW_ROOT) {
        Ok(Some(port)) => channel.send(&GuestEvent::AgentReady { port }),
        Ok(None) => {}
        Err(e) => console(&format!("supermachine-init: the agent did not start: {e}")),
    }
    let identity = user::resolve(&config.user, NEW_ROOT).map_err(|e| e.to_string())?;
    workload::run(
        &config,
        &identity,
        NEW_ROOT,
        channel,
        Duration::from_secs(2),
    )
    .map_err(|e| e.to_string())
}

/// Acts on the host's commands for the life of the VM.
fn follow_host(port: std::fs::File, channel: Channel) {
    use supermachine_init::system;
    use supermachine_protocol::{FrameReader, HostCommand};
    let mut frames = FrameReader::new(port);
    loop {
        match frames.read::<HostCommand>() {
            Ok(Some(HostCommand::Refresh {
                unix_nanos,
                entropy,
                volumes,
            })) => {
                let mut errors = Vec::new();
                if let Err(e) = mounts::mount_volumes(&volumes, NEW_ROOT) {
                    errors.push(e.to_string());
                }
                if let Err(e) = system::set_time(unix_nanos) {
                    errors.push(format!("setting the clock: {e}"));
                }
                if let Err(e) = system::add_entropy(&entropy) {
                    errors.push(format!("adding entropy: {e}"));
                }
                channel.send(&GuestEvent::Refreshed {
                    error: errors.join("; "),
                });
                if let Err(e) = net::announce() {
                    console(&format!("supermachine-init: announcing after restore: {e}"));
                }
            }
            Ok(None) => return,
            // Garbage on the line (a restore can cut a frame): resynchronise by waiting.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Writes a diagnostic line to the console (the host keeps it as the VM's console log).
pub(crate) fn console(msg: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(f, "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// Milliseconds since the guest booted (CLOCK_BOOTTIME).
pub(crate) fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}
