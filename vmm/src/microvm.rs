//! A running microVM, for whoever drives it: the event loop that serves its devices and
//! vCPU exits, pause + snapshot, resume, host input to its UARTs, and stopping it on drop.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{evt_clone, MmioDevice, Wiring};
use crate::devices::legacy::serial::{Output, SerialDevice};
use crate::devices::legacy::serial_input::{SerialInput, StreamWatch};
use crate::error::{Result, VmmError};
use crate::event_loop::{EventLoop, Wake};
use crate::persist::MicroVmState;
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::vcpu::{VcpuCommand, VcpuExitReason, VcpuHandle, VcpuResponse, VcpuRunner};

/// Why a microVM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted or powered off through the i8042 (`reboot=k`): a clean exit.
    Reset,
    /// The guest kernel panicked (seen on the console).
    GuestPanic,
    /// A triple fault.
    TripleFault,
    /// KVM could not run the guest.
    Failed(String),
}

/// Watches console output for a kernel panic.
pub(crate) struct PanicWatch {
    inner: Output,
    seen: Arc<AtomicBool>,
    tail: Vec<u8>,
}

impl PanicWatch {
    /// Passes output on to `inner`, setting `seen` once a panic goes by.
    pub(crate) fn new(inner: Output, seen: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            seen,
            tail: Vec::new(),
        }
    }
}

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

impl Write for PanicWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self.tail.windows(PANIC_MARK.len()).any(|w| w == PANIC_MARK) {
            self.seen.store(true, Ordering::SeqCst);
        }
        let keep = self.tail.len().saturating_sub(PANIC_MARK.len());
        self.tail.drain(..keep);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A running microVM, made by [`MicroVm::boot`] or [`MicroVm::restore`].
pub struct MicroVm {
    _kvm: Arc<Kvm>,
    vm: VmFd,
    mem: GuestMemoryMmap,
    _memfd: Option<File>,
    vcpus: Vec<VcpuHandle>,
    /// Unmapped last (after the vCPUs and the VM are gone): see `Drop`.
    reservation: Option<memory::Reservation>,
    responses: Receiver<VcpuResponse>,
    serials: Vec<Arc<Mutex<SerialDevice>>>,
    /// Host input feeding a UART (the control channel), if attached.
    serial_input: Option<SerialInput>,
    devices: Vec<MmioDevice>,
    event_loop: EventLoop,
    /// Wakes the event loop for the VM's owner (see [`MicroVm::waker`]).
    waker: EventFd,
    exit_evt: EventFd,
    reset_evt: EventFd,
    panic_seen: Arc<AtomicBool>,
    exited: Option<ExitReason>,
    paused: bool,
}

impl MicroVm {
    /// Starts a VM whose devices are wired: the event loop, then a thread per vCPU (a
    /// parked one where the wiring has it).
    pub(crate) fn start(
        kvm: Arc<Kvm>,
        vm: VmFd,
        mem: GuestMemoryMmap,
        memfd: Option<File>,
        fds: Vec<kvm_ioctls::VcpuFd>,
        mut wiring: Wiring,
        panic_seen: Arc<AtomicBool>,
    ) -> Result<MicroVm> {
        let mut parked = std::mem::take(&mut wiring.threads);
        let event_loop = EventLoop::new()?;
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
        event_loop.add_vcpu_exit(&exit_evt)?;
        event_loop.add_reset(&wiring.reset_evt)?;
        let waker = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
        event_loop.add_waker(&waker)?;
        for (i, (_, _, t)) in wiring.devices.iter().enumerate() {
            event_loop.add_device(i, t)?;
        }
        let (resp_tx, responses) = channel();
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = channel();
            let runner = VcpuRunner {
                id: id as u8,
                fd,
                kvm: kvm.clone(),
                pio: wiring.pio.clone(),
                mmio: wiring.mmio.clone(),
                responses: resp_tx.clone(),
                exit_evt: evt_clone(&exit_evt)?,
            };
            let thread = match parked.pop() {
                Some(p) => p.start(runner, cmd_rx)?,
                None => runner
                    .spawn(cmd_rx)
                    .map_err(|e| VmmError::io("spawning a vCPU thread", e))?,
            };
            vcpus.push(VcpuHandle {
                thread,
                commands: cmd_tx,
            });
        }
        Ok(MicroVm {
            _kvm: kvm,
            vm,
            mem,
            _memfd: memfd,
            vcpus,
            reservation: None,
            responses,
            serials: wiring.serials,
            serial_input: None,
            devices: wiring.devices,
            event_loop,
            waker,
            exit_evt,
            reset_evt: wiring.reset_evt,
            panic_seen,
            exited: None,
            paused: false,
        })
    }

    /// Keeps the registered guest address space `memory` was mapped over, to unmap it last.
    pub(crate) fn keep_reservation(&mut self, reservation: Option<memory::Reservation>) {
        self.reservation = reservation;
    }

    /// Runs the event loop for up to `timeout` (or until something happens when `None`).
    /// Returns why the VM stopped, once it has.
    pub fn run(&mut self, timeout: Option<Duration>) -> Result<Option<ExitReason>> {
        if self.exited.is_some() {
            return Ok(self.exited.clone());
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        for wake in self.event_loop.wait(ms)? {
            match wake {
                Wake::Queue { device, queue } => {
                    if let Some((_, _, t)) = self.devices.get(device) {
                        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(e) = t.queue_evts.get(queue) {
                            let _ = e.read();
                        }
                        t.process_queue(queue);
                    }
                }
                Wake::Backend { device } => {
                    if let Some((_, _, t)) = self.devices.get(device) {
                        t.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .process_backend();
                    }
                }
                Wake::VcpuExit => {
                    let _ = self.exit_evt.read();
                    while let Ok(r) = self.responses.try_recv() {
                        if let VcpuResponse::Exited(id, reason) = r {
                            self.exited = Some(match reason {
                                VcpuExitReason::Shutdown => ExitReason::TripleFault,
                                VcpuExitReason::Failed(why) => {
                                    ExitReason::Failed(format!("vCPU {id}: {why}"))
                                }
                            });
                        }
                    }
                }
                Wake::Woken => {
                    let _ = self.waker.read();
                }
                Wake::SerialInput | Wake::SerialDrained => {
                    if let Some(input) = self.serial_input.as_mut() {
                        let fd = input.stream_fd();
                        let watch = if wake == Wake::SerialInput {
                            input.on_readable()
                        } else {
                            input.on_drained()
                        };
                        match watch {
                            StreamWatch::Read => self.event_loop.watch_serial_input(fd, true)?,
                            StreamWatch::Pause => self.event_loop.watch_serial_input(fd, false)?,
                            StreamWatch::Closed => {
                                let _ = self.event_loop.remove(fd);
                            }
                        }
                    }
                }
                Wake::Reset => {
                    let _ = self.reset_evt.read();
                    self.exited = Some(if self.panic_seen.load(Ordering::SeqCst) {
                        ExitReason::GuestPanic
                    } else {
                        ExitReason::Reset
                    });
                }
            }
        }
        Ok(self.exited.clone())
    }

    /// Pauses every vCPU (each saves its own state) and writes `restore.snap` at `path`.
    /// The VM stays paused; [`MicroVm::resume`] continues it.
    pub fn pause_and_snapshot(&mut self, path: &Path) -> Result<u64> {
        let mut states = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Pause);
            v.kick();
        }
        self.paused = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while states.len() < self.vcpus.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(VcpuResponse::Paused(s)) => states.push((*s)?),
                Ok(VcpuResponse::Exited(id, reason)) => {
                    return Err(VmmError::Vcpu {
                        id,
                        reason: format!("exited while pausing: {reason:?}"),
                    })
                }
                Err(_) => {
                    return Err(VmmError::Vcpu {
                        id: states.len(),
                        reason: "did not pause within 10 s".into(),
                    })
                }
            }
        }
        MicroVmState::save(states, &self.vm, &self.serials, &self.devices)?.write(path, &self.mem)
    }

    pub fn resume(&mut self) {
        if self.paused {
            for v in &self.vcpus {
                let _ = v.commands.send(VcpuCommand::Resume);
            }
            self.paused = false;
        }
    }

    /// Feeds what the host writes to `stream` into UART `index` (0: ttyS0, 1: ttyS1) as
    /// the guest reads it. At most one UART takes host input.
    pub fn attach_serial_input(&mut self, index: usize, stream: UnixStream) -> Result<()> {
        let Some(serial) = self.serials.get(index) else {
            return Err(VmmError::Config(format!("no UART {index}")));
        };
        if self.serial_input.is_some() {
            return Err(VmmError::Config("a UART already takes host input".into()));
        }
        let drained = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_drained_evt()
            .map_err(|e| VmmError::io("duplicating an eventfd", e))?;
        let input = SerialInput::new(stream, serial.clone(), drained);
        self.event_loop
            .add_serial_input(input.stream_fd(), input.drained_fd())?;
        self.serial_input = Some(input);
        Ok(())
    }

    /// An eventfd that, written, makes [`MicroVm::run`] return: how another thread gets
    /// the attention of the one running the VM.
    pub fn waker(&self) -> Result<EventFd> {
        evt_clone(&self.waker)
    }

    /// Input for the guest's ttyS0.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.serials
            .first()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).enqueue(bytes))
            .unwrap_or(0)
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Stop);
            v.kick();
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
        // The devices hold guest memory; the reservation goes after them.
        self.devices.clear();
        self.serials.clear();
        let _ = self.reservation.take();
    }
}
