//! The vsock device driven by a test playing the guest driver, against real unix sockets
//! on the host side; and fuzzing of TX chains and packet headers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::{Vsock, GUEST_CID};
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, QueueContext, VirtioDevice};
use crate::vstate::memory::GuestMemoryMmap;

const RX_BUFS: u16 = 16;
const RX_BUF_LEN: u32 = 4096;
const TX_AREA: u64 = DATA_START + 0x20_0000;

struct Guest {
    mem: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    queues: Vec<virtio_queue::Queue>,
    irq: Interrupt,
    dev: Vsock,
    rx_seen: u16,
    tx_slot: u64,
    _dir: tempfile::TempDir,
    uds: std::path::PathBuf,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.sock");
        let mem = memory();
        let mut rx = TestQueue::new(0);
        let tx = TestQueue::new(1);
        let ev = TestQueue::new(2);
        for i in 0..RX_BUFS {
            rx.add_chain(
                &mem,
                &[(DATA_START + u64::from(i) * 0x1000, RX_BUF_LEN, true)],
            );
        }
        let queues = vec![rx.queue(), tx.queue(), ev.queue()];
        let mut g = Guest {
            dev: Vsock::new(GUEST_CID, &uds).unwrap(),
            mem,
            rx,
            tx,
            queues,
            irq: Interrupt::new().unwrap(),
            rx_seen: 0,
            tx_slot: 0,
            _dir: dir,
            uds,
        };
        g.with_ctx(|d, ctx| d.activate(ctx));
        g
    }

    fn with_ctx(&mut self, f: impl FnOnce(&mut Vsock, &mut QueueContext)) {
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.irq,
        };
        f(&mut self.dev, &mut ctx);
    }

    /// Lets the device react to host socket activity.
    fn poll_host(&mut self) {
        for _ in 0..20 {
            self.with_ctx(|d, ctx| d.process_backend(ctx));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn send(&mut self, hdr: Header, data: &[u8]) {
        let at = TX_AREA + (self.tx_slot % 64) * 0x1_0000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(at + HDR_SIZE as u64))
            .unwrap();
        self.tx
            .add_chain(&self.mem, &[(at, (HDR_SIZE + data.len()) as u32, false)]);
        self.with_ctx(|d, ctx| d.process_queue(ctx, 1));
    }

    /// Packets the device delivered since the last call (their buffers are re-posted).
    fn received(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx(&self.mem) {
            let (head, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = DATA_START + u64::from(head) % u64::from(RX_BUFS) * 0x1000;
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let mut r: &[u8] = &b;
            out.push(read_packet(&mut r).unwrap());
            self.rx.add_chain(&self.mem, &[(addr, RX_BUF_LEN, true)]);
        }
        out
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: 2,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn host_connect_handshake_data_credit_and_shutdown() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    g.poll_host();
    let pkts = g.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].hdr;
    assert_eq!(
        (req.op, req.dst_port, req.src_cid, req.dst_cid),
        (OP_REQUEST, 1234, 2, GUEST_CID)
    );
    let local = req.src_port;

    // The guest accepts with room for only 8 bytes.
    g.send(g.hdr(1234, local, OP_RESPONSE, 8, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));

    host.write_all(b"0123456789abcdef").unwrap();
    g.poll_host();
    let pkts = g.received();
    let data: Vec<u8> = pkts.iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(
        data, b"01234567",
        "no more than the guest's credit: {pkts:?}"
    );
    assert!(pkts.iter().any(|p| p.hdr.op == OP_CREDIT_REQUEST));
    // The guest consumed them: the rest follows.
    g.send(g.hdr(1234, local, OP_CREDIT_UPDATE, 8, 8), &[]);
    g.poll_host();
    let data: Vec<u8> = g.received().iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(data, b"89abcdef");

    // Guest -> host.
    let mut h = g.hdr(1234, local, OP_RW, 64, 16);
    h.len = 4;
    g.send(h, b"pong");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // The guest closes: the host sees EOF and the guest gets an RST.
    let mut sd = g.hdr(1234, local, OP_SHUTDOWN, 64, 16);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert!(g.received().iter().any(|p| p.hdr.op == OP_RST));
    assert_eq!(g.dev.connection_count(), 0);

    // Data to a connection that does not exist is answered with an RST.
    let mut stray = g.hdr(5, 77, OP_RW, 64, 0);
    stray.len = 1;
    g.send(stray, b"x");
    let pkts = g.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].hdr.op, pkts[0].hdr.dst_port), (OP_RST, 5));

    // A bad handshake is refused without a connection.
    let mut bad = UnixStream::connect(&g.uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    g.poll_host();
    assert!(read_line(&mut bad).starts_with("ERR"));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_eof_becomes_a_guest_shutdown() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 80\n").unwrap();
    g.poll_host();
    let local = g.received()[0].hdr.src_port;
    g.send(g.hdr(80, local, OP_RESPONSE, 4096, 0), &[]);
    let mut line = String::new();
    let mut b = [0u8; 1];
    while host.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0] as char);
    }
    host.write_all(b"bye").unwrap();
    drop(host);
    g.poll_host();
    let pkts = g.received();
    assert_eq!(pkts[0].data, b"bye");
    assert!(pkts
        .iter()
        .any(|p| p.hdr.op == OP_SHUTDOWN && p.hdr.flags == SHUTDOWN_RCV | SHUTDOWN_SEND));
}

/// Opens a host-initiated connection and has the guest accept it with `buf_alloc` of room.
fn established(g: &mut Guest, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    g.poll_host();
    let local = g.received()[0].hdr.src_port;
    g.send(g.hdr(port, local, OP_RESPONSE, buf_alloc, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    (host, local)
}

/// A host that shuts only its write side (a request sent, the answer awaited) still gets
/// the answer: the guest is told SHUTDOWN_SEND, not a full shutdown that would reset it.
#[test]
fn a_host_half_close_still_gets_the_answer() {
    let mut g = Guest::new();
    let (mut host, local) = established(&mut g, 80, 4096);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.poll_host();
    let pkts = g.received();
    let data: Vec<u8> = pkts.iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(data, b"request");
    let shutdowns: Vec<u32> = pkts
        .iter()
        .filter(|p| p.hdr.op == OP_SHUTDOWN)
        .map(|p| p.hdr.flags)
        .collect();
    assert_eq!(shutdowns, vec![SHUTDOWN_SEND], "{pkts:?}");
    assert!(!pkts.iter().any(|p| p.hdr.op == OP_RST));

    let mut h = g.hdr(80, local, OP_RW, 4096, 7);
    h.len = 6;
    g.send(h, b"answer");
    let mut sd = g.hdr(80, local, OP_SHUTDOWN, 4096, 7);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"answer");
    assert!(g.received().iter().any(|p| p.hdr.op == OP_RST));
    assert_eq!(g.dev.connection_count(), 0);
}

/// What the guest sent before it closed reaches the host whole, even when the host reads
/// only after the close (the bytes wait in the device until the host's socket takes them).
#[test]
fn guest_data_the_host_has_not_read_survives_the_guest_closing() {
    let mut g = Guest::new();
    let (mut host, local) = established(&mut g, 80, 4096);
    let sent: Vec<u8> = (0..240 * 1024u32).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in sent.chunks(4096).enumerate() {
        let mut h = g.hdr(80, local, OP_RW, 4096, 0);
        h.len = chunk.len() as u32;
        g.send(h, chunk);
        assert!(
            !g.received().iter().any(|p| p.hdr.op == OP_RST),
            "reset after chunk {i}"
        );
    }
    let mut sd = g.hdr(80, local, OP_SHUTDOWN, 4096, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert_eq!(
        g.dev.connection_count(),
        1,
        "closed before the host read it all"
    );

    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        host.read_to_end(&mut got).map(|_| got)
    });
    while !reader.is_finished() {
        g.poll_host();
    }
    let got = reader.join().unwrap().unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "bytes differ");
    g.poll_host();
    assert!(g.received().iter().any(|p| p.hdr.op == OP_RST));
    assert_eq!(g.dev.connection_count(), 0);
}

/// Random chains and headers on TX (with random host activity): no panic, every chain
/// consumed, RX stays well-formed.
#[test]
fn fuzz_tx_chains_and_packet_headers() {
    let mut g = Guest::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_50c4);
    let mut hosts = Vec::new();
    let iterations = 100_000u32;
    let mut valid = 0u16;
    let shape = ChainFuzz {
        area: (TX_AREA, 0x10_0000),
        max_len: 200,
        max_descs: 3,
        p_write: 0.2,
        p_indirect: 0.02,
    };
    for i in 0..iterations {
        if i % 5000 == 0 {
            if let Ok(mut s) = UnixStream::connect(&g.uds) {
                let _ = s.write_all(format!("CONNECT {}\n", rng.gen_range(1..4u32)).as_bytes());
                let _ = s.set_nonblocking(true);
                hosts.push(s);
            }
            g.with_ctx(|d, ctx| d.process_backend(ctx));
        }
        let (head, addrs) = g.tx.write_random_chain(&g.mem, &mut rng, &shape);
        for addr in addrs {
            if fits(addr, HDR_SIZE) {
                let h = Header {
                    src_cid: if rng.gen_bool(0.8) {
                        GUEST_CID
                    } else {
                        rng.gen()
                    },
                    dst_cid: if rng.gen_bool(0.8) { 2 } else { rng.gen() },
                    src_port: rng.gen_range(1..4),
                    dst_port: if rng.gen_bool(0.5) {
                        (1 << 30) + rng.gen_range(0..4)
                    } else {
                        rng.gen()
                    },
                    len: if rng.gen_bool(0.8) {
                        rng.gen_range(0..64)
                    } else {
                        rng.gen()
                    },
                    type_: if rng.gen_bool(0.9) {
                        TYPE_STREAM
                    } else {
                        rng.gen()
                    },
                    op: rng.gen_range(0..9),
                    flags: rng.gen_range(0..4),
                    buf_alloc: rng.gen(),
                    fwd_cnt: rng.gen(),
                };
                g.mem
                    .write_slice(&h.to_bytes(), GuestAddress(addr))
                    .unwrap();
            }
        }
        let real = g.tx.publish_fuzzed(&g.mem, &mut rng, head);
        valid = valid.wrapping_add(u16::from(real));
        g.with_ctx(|d, ctx| d.process_queue(ctx, 1));
        if i % 64 == 0 {
            let _ = g.received();
        }
    }
    assert_eq!(g.queues[1].next_avail(), iterations as u16);
    assert_eq!(g.tx.used_idx(&g.mem), valid);
    // Whatever the device produced for RX parses as packets (checked in received()).
    let _ = g.received();
}

/// A guest that behaves like Linux's virtio-vsock transport (it announces freed room only
/// when less than 64 KiB of its buffer is left, answers credit requests, sends no more than
/// our credit) and an application in it that echoes everything back, while the host pushes
/// 10 MiB and reads the echo at the same time: every byte comes back, in order, and nothing
/// stalls (the router's large-body test does this through a real guest).
#[test]
fn a_large_echo_flows_both_ways_at_once() {
    const GUEST_BUF: u32 = 256 * 1024;
    const APP_PIPE: usize = 64 * 1024;
    const TOTAL: usize = 10 << 20;
    let mut g = Guest::new();
    let (host, local) = established(&mut g, 80, GUEST_BUF);
    host.set_read_timeout(None).unwrap();
    let body: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut w = host.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            w.write_all(&body).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let reader = {
        let mut r = host;
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1500];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("host read: {e}"),
                }
            }
        })
    };

    let mut unread: std::collections::VecDeque<u8> = Default::default();
    let mut echo: std::collections::VecDeque<u8> = Default::default();
    let (mut fwd_cnt, mut last_fwd_sent, mut tx_cnt) = (0u32, 0u32, 0u32);
    let (mut host_alloc, mut host_fwd) = (0u32, 0u32);
    let (mut host_done, mut closed) = (false, false);
    let mut last_progress = std::time::Instant::now();
    let mut progress_mark = (0u32, 0u32, 0usize);
    let credit_update = |g: &Guest, fwd: u32| g.hdr(80, local, OP_CREDIT_UPDATE, GUEST_BUF, fwd);
    while !(closed && reader.is_finished()) {
        g.with_ctx(|d, ctx| d.process_backend(ctx));
        for p in g.received() {
            host_alloc = p.hdr.buf_alloc;
            host_fwd = p.hdr.fwd_cnt;
            match p.hdr.op {
                OP_RW => {
                    assert!(
                        unread.len() + p.data.len() <= GUEST_BUF as usize,
                        "the device overran the guest's credit"
                    );
                    unread.extend(p.data);
                }
                OP_CREDIT_REQUEST => {
                    let h = credit_update(&g, fwd_cnt);
                    last_fwd_sent = fwd_cnt;
                    g.send(h, &[]);
                }
                OP_CREDIT_UPDATE => {}
                OP_SHUTDOWN => host_done = true,
                OP_RST if closed => {}
                op => panic!("unexpected op {op}: {:?}", p.hdr),
            }
        }
        // The application moves what arrived into its pipe; the guest announces room.
        let moved = (APP_PIPE - echo.len()).min(unread.len());
        echo.extend(unread.drain(..moved));
        fwd_cnt = fwd_cnt.wrapping_add(moved as u32);
        if moved > 0 && GUEST_BUF - fwd_cnt.wrapping_sub(last_fwd_sent) < 64 * 1024 {
            let h = credit_update(&g, fwd_cnt);
            last_fwd_sent = fwd_cnt;
            g.send(h, &[]);
        }
        // The echo goes back as far as the host's credit allows.
        loop {
            let credit = host_alloc.saturating_sub(tx_cnt.wrapping_sub(host_fwd)) as usize;
            let n = credit.min(echo.len()).min(4096);
            if n == 0 {
                break;
            }
            let chunk: Vec<u8> = echo.drain(..n).collect();
            let mut h = g.hdr(80, local, OP_RW, GUEST_BUF, fwd_cnt);
            h.len = n as u32;
            last_fwd_sent = fwd_cnt;
            tx_cnt = tx_cnt.wrapping_add(n as u32);
            g.send(h, &chunk);
        }
        if host_done && unread.is_empty() && echo.is_empty() && !closed {
            let mut sd = g.hdr(80, local, OP_SHUTDOWN, GUEST_BUF, fwd_cnt);
            sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            g.send(sd, &[]);
            closed = true;
        }
        let mark = (fwd_cnt, tx_cnt, unread.len());
        if mark != progress_mark {
            progress_mark = mark;
            last_progress = std::time::Instant::now();
        } else {
            assert!(
                last_progress.elapsed() < Duration::from_secs(10),
                "stalled: guest consumed {fwd_cnt}, echoed {tx_cnt}, host credit {host_alloc}/{host_fwd}, \
                 unread {}, pipe {}, host done {host_done}",
                unread.len(),
                echo.len()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    writer.join().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the echo differs");
}
