//! TcpForwarder: a localhost TCP listener whose connections are bridged, through the guest
//! agent, to a port inside the VM (`Vm::expose_tcp`, `supermachine boot -p`).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::agent::{pump, AgentClient};

pub struct TcpForwarder {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpForwarder {
    pub(crate) fn start(
        listen: SocketAddr,
        agent: AgentClient,
        guest_port: u16,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let agent = agent.clone();
                std::thread::spawn(move || bridge(client, &agent, guest_port));
            }
        });
        Ok(Self {
            local_addr,
            stopping,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting; connections already bridged carry on until they close.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(h) = self.acceptor.take() {
            self.stopping.store(true, Ordering::SeqCst);
            // Wake the blocking accept.
            let _ = TcpStream::connect(self.local_addr);
            let _ = h.join();
        }
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bridge(client: TcpStream, agent: &AgentClient, guest_port: u16) {
    let _ = client.set_nodelay(true);
    let guest = match agent.connect(guest_port) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(guest_port, error = %e, "forwarded connection refused by the guest");
            return;
        }
    };
    let (Ok(c2), Ok(g2)) = (client.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pump(client, guest));
    pump(g2, c2);
    let _ = up.join();
}
