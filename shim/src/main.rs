//! supermachine-shim: the guest agent. init starts it after the image's root is assembled
//! and before the workload; it chroots itself into that root (its own binary stays in the
//! initramfs, invisible to the workload) and serves one request per stream from the
//! listeners the backend needs: TCP (QEMU forwards a host port to it through its user-mode
//! network) and, when the VM has a virtio vsock device (the kvm backend), AF_VSOCK.

mod exec;
mod files;
mod listener;
mod ports;
mod system;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use supermachine_protocol::agent::{AgentRequest, Hello, Reply, AGENT_PORT, PROTOCOL_VERSION};
use supermachine_protocol::{write_frame, FrameReader, RunConfig};

use listener::{AgentListener, AgentStream};

/// What every request needs: the image's defaults and a handle on init's run directory.
pub struct Context {
    pub config: RunConfig,
    /// `/run/supermachine` of the initramfs, opened before the chroot (workload pid file).
    pub run_dir: OwnedFd,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = run(&args) {
        eprintln!("supermachine-shim: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<(), String> {
    // argv: shim CONFIG_PATH NEW_ROOT READY_FD
    let [_, config_path, new_root, ready_fd] = args else {
        return Err("usage: supermachine-shim CONFIG NEW_ROOT READY_FD".into());
    };
    let raw = std::fs::read(config_path).map_err(|e| format!("reading {config_path}: {e}"))?;
    let config = RunConfig::from_json(&raw).map_err(|e| format!("parsing {config_path}: {e}"))?;
    let run_dir = nix::fcntl::open(
        "/run/supermachine",
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening /run/supermachine: {e}"))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let run_dir = unsafe { OwnedFd::from_raw_fd(run_dir) };
    // Listeners are bound before the chroot (the vsock check reads init's /sys). TCP is
    // what QEMU's user-mode network forwards to; vsock is how the kvm backend's host
    // reaches the guest. Both run when the VM has a vsock device.
    let mut listeners: Vec<Box<dyn AgentListener>> = vec![Box::new(
        listener::TcpAgentListener::bind(AGENT_PORT)
            .map_err(|e| format!("binding the agent port: {e}"))?,
    )];
    if listener::vsock_device_present() {
        listeners.push(Box::new(
            listener::VsockAgentListener::bind(u32::from(AGENT_PORT))
                .map_err(|e| format!("binding vsock port {AGENT_PORT}: {e}"))?,
        ));
    }
    nix::unistd::chroot(new_root.as_str()).map_err(|e| format!("chroot {new_root}: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    let ready: i32 = ready_fd
        .parse()
        .map_err(|_| format!("bad READY_FD {ready_fd:?}"))?;
    // SAFETY: init passed this descriptor to us for exactly this use; we own it now.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ready) });
    let _ = ready.write_all(b"1");
    drop(ready);

    let ctx: &'static Context = Box::leak(Box::new(Context { config, run_dir }));
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| std::thread::spawn(move || accept_forever(ctx, l.as_ref())))
        .collect();
    for t in accepting {
        let _ = t.join();
    }
    Err("every agent listener stopped".into())
}

fn accept_forever(ctx: &'static Context, listener: &dyn AgentListener) {
    loop {
        match listener.accept() {
            Ok(stream) => {
                std::thread::spawn(move || serve(ctx, stream));
            }
            Err(e) => {
                eprintln!("supermachine-shim: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn serve(ctx: &Context, stream: Box<dyn AgentStream>) {
    let Ok(mut writer) = stream.try_clone_stream() else {
        return;
    };
    if write_frame(
        &mut writer,
        &Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .is_err()
    {
        return;
    }
    let mut reader = FrameReader::new(stream);
    let request: AgentRequest = match reader.read() {
        Ok(Some(r)) => r,
        _ => return,
    };
    let result = match request {
        AgentRequest::Ping => reply(&mut writer, Ok(())),
        AgentRequest::Exec(req) => exec::run(ctx, req, reader, writer),
        AgentRequest::WriteFile { path, mode } => {
            let r = files::write(&path, mode, &mut reader);
            reply(&mut writer, r)
        }
        AgentRequest::ReadFile { path, max_bytes } => files::read(&path, max_bytes, &mut writer),
        AgentRequest::Signal { signum } => {
            let r = system::signal_workload(ctx, signum);
            reply(&mut writer, r)
        }
        AgentRequest::SetTime { unix_nanos } => reply(&mut writer, system::set_time(unix_nanos)),
        AgentRequest::AddEntropy { bytes } => reply(&mut writer, system::add_entropy(&bytes)),
        AgentRequest::Connect { port } => ports::connect(port, reader.into_inner(), writer),
        AgentRequest::WaitListening { port, timeout_ms } => {
            let r = ports::wait_listening(port, std::time::Duration::from_millis(timeout_ms));
            reply(&mut writer, r)
        }
    };
    if let Err(e) = result {
        eprintln!("supermachine-shim: request failed: {e}");
    }
}

/// Sends `Reply::Ok` or the error.
fn reply(w: &mut dyn Write, r: Result<(), std::io::Error>) -> Result<(), String> {
    let msg = match r {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::Error {
            kind: error_kind(&e),
            message: e.to_string(),
        },
    };
    write_frame(w, &msg).map_err(|e| e.to_string())
}

pub fn error_kind(e: &std::io::Error) -> supermachine_protocol::agent::ErrorKind {
    use supermachine_protocol::agent::ErrorKind;
    if e.raw_os_error() == Some(libc::EFBIG) {
        return ErrorKind::TooLarge;
    }
    ErrorKind::from_io(e.kind())
}
