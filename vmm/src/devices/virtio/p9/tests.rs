use std::path::Path;

use rand::{Rng, SeedableRng};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::wire::{msg, Decoder, Encoder, HEADER_LEN};
use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, QueueContext, VirtioDevice};

const ROOM: usize = 1 << 20;

fn t(kind: u8, body: impl FnOnce(&mut Encoder)) -> Vec<u8> {
    let mut e = Encoder::new(kind, 1);
    body(&mut e);
    e.finish()
}

/// Sends one request; Ok(body of the R-message) or Err(errno of an Rlerror).
fn call(s: &mut Server, req: Vec<u8>) -> Result<Vec<u8>, i32> {
    let kind = req[4];
    let r = s.handle(&req, ROOM);
    assert!(r.len() >= HEADER_LEN, "no reply to type {kind}");
    assert_eq!(
        u32::from_le_bytes(r[..4].try_into().unwrap()) as usize,
        r.len()
    );
    if r[4] == msg::RLERROR {
        return Err(Decoder::new(&r[HEADER_LEN..]).u32().unwrap() as i32);
    }
    assert_eq!(r[4], kind + 1);
    Ok(r[HEADER_LEN..].to_vec())
}

fn attach(s: &mut Server, fid: u32) {
    call(
        s,
        t(msg::TVERSION, |e| {
            e.u32(65536).string(b"9P2000.L");
        }),
    )
    .unwrap();
    call(
        s,
        t(msg::TATTACH, |e| {
            e.u32(fid).u32(u32::MAX).string(b"root").string(b"").u32(0);
        }),
    )
    .unwrap();
}

fn walk(s: &mut Server, fid: u32, new: u32, names: &[&[u8]]) -> Result<usize, i32> {
    let r = call(
        s,
        t(msg::TWALK, |e| {
            e.u32(fid).u32(new).u16(names.len() as u16);
            for n in names {
                e.string(n);
            }
        }),
    )?;
    Ok(usize::from(Decoder::new(&r).u16().unwrap()))
}

fn lopen(s: &mut Server, fid: u32, flags: i32) -> Result<(), i32> {
    call(
        s,
        t(msg::TLOPEN, |e| {
            e.u32(fid).u32(flags as u32);
        }),
    )
    .map(|_| ())
}

fn read(s: &mut Server, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>, i32> {
    let r = call(
        s,
        t(msg::TREAD, |e| {
            e.u32(fid).u64(offset).u32(count);
        }),
    )?;
    let n = Decoder::new(&r).u32().unwrap() as usize;
    Ok(r[4..4 + n].to_vec())
}

fn names_in(s: &mut Server, dir_fid: u32) -> Vec<String> {
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        // A small count: several calls, each resuming at the last entry's cookie.
        let r = call(
            s,
            t(msg::TREADDIR, |e| {
                e.u32(dir_fid).u64(offset).u32(64);
            }),
        )
        .unwrap();
        let mut d = Decoder::new(&r);
        let n = d.u32().unwrap() as usize;
        if n == 0 {
            break;
        }
        let mut d = Decoder::new(&r[4..4 + n]);
        while let Ok(_kind) = d.u8() {
            d.u32().unwrap();
            d.u64().unwrap();
            offset = d.u64().unwrap();
            d.u8().unwrap();
            names.push(String::from_utf8(d.string().unwrap().to_vec()).unwrap());
        }
    }
    names.sort();
    names
}

fn export() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("export");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("secret"), b"outside").unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from the host").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    (dir, root)
}

#[test]
fn files_directories_and_links_round_trip() {
    let (_dir, root) = export();
    let mut s = Server::new(Some(&root), false).unwrap();
    attach(&mut s, 0);

    // Read a host file.
    assert_eq!(walk(&mut s, 0, 1, &[b"hello.txt"]), Ok(1));
    lopen(&mut s, 1, libc::O_RDONLY).unwrap();
    assert_eq!(read(&mut s, 1, 6, 100).unwrap(), b"from the host");

    // Create, write, fsync, truncate through setattr, getattr.
    walk(&mut s, 0, 2, &[b"sub"]).unwrap();
    call(
        &mut s,
        t(msg::TLCREATE, |e| {
            e.u32(2)
                .string(b"new.txt")
                .u32(libc::O_RDWR as u32)
                .u32(0o640)
                .u32(0);
        }),
    )
    .unwrap();
    let r = call(
        &mut s,
        t(msg::TWRITE, |e| {
            e.u32(2).u64(0).u32(11).bytes(b"from guest!");
        }),
    )
    .unwrap();
    assert_eq!(Decoder::new(&r).u32(), Ok(11));
    call(
        &mut s,
        t(msg::TFSYNC, |e| {
            e.u32(2).u32(0);
        }),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(root.join("sub/new.txt")).unwrap(),
        b"from guest!"
    );
    call(
        &mut s,
        t(msg::TSETATTR, |e| {
            e.u32(2).u32(0x8 | 0x1).u32(0o600).u32(0).u32(0).u64(4);
            e.u64(0).u64(0).u64(0).u64(0);
        }),
    )
    .unwrap();
    let meta = std::fs::metadata(root.join("sub/new.txt")).unwrap();
    assert_eq!(meta.len(), 4);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let r = call(
        &mut s,
        t(msg::TGETATTR, |e| {
            e.u32(2).u64(0x7ff);
        }),
    )
    .unwrap();
    let mut d = Decoder::new(&r[8 + 13..]);
    assert_eq!(d.u32().unwrap() & 0o777, 0o600);

    // mkdir, symlink, hard link, readlink, rename, unlink; readdir sees the result.
    call(
        &mut s,
        t(msg::TMKDIR, |e| {
            e.u32(0).string(b"made").u32(0o755).u32(0);
        }),
    )
    .unwrap();
    call(
        &mut s,
        t(msg::TSYMLINK, |e| {
            e.u32(0).string(b"link").string(b"hello.txt").u32(0);
        }),
    )
    .unwrap();
    walk(&mut s, 0, 9, &[b"sub"]).unwrap();
    walk(&mut s, 0, 3, &[b"hello.txt"]).unwrap();
    call(
        &mut s,
        t(msg::TLINK, |e| {
            e.u32(0).u32(3).string(b"hard");
        }),
    )
    .unwrap();
    walk(&mut s, 0, 4, &[b"link"]).unwrap();
    let r = call(
        &mut s,
        t(msg::TREADLINK, |e| {
            e.u32(4);
        }),
    )
    .unwrap();
    assert_eq!(Decoder::new(&r).string().unwrap(), b"hello.txt");
    call(
        &mut s,
        t(msg::TRENAMEAT, |e| {
            e.u32(0).string(b"made").u32(9).string(b"moved");
        }),
    )
    .unwrap();
    assert!(root.join("sub/moved").is_dir());
    call(
        &mut s,
        t(msg::TUNLINKAT, |e| {
            e.u32(9).string(b"moved").u32(0x200);
        }),
    )
    .unwrap();
    let meta = std::fs::metadata(root.join("hard")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.nlink(), 2);
    walk(&mut s, 0, 5, &[]).unwrap();
    lopen(&mut s, 5, libc::O_RDONLY | libc::O_DIRECTORY).unwrap();
    assert_eq!(
        names_in(&mut s, 5),
        [".", "..", "hard", "hello.txt", "link", "sub"]
    );
    // Rename through a fid: the host file moves, and every fid on that path follows.
    walk(&mut s, 0, 6, &[b"sub", b"new.txt"]).unwrap();
    call(
        &mut s,
        t(msg::TRENAME, |e| {
            e.u32(6).u32(0).string(b"renamed.txt");
        }),
    )
    .unwrap();
    assert!(root.join("renamed.txt").is_file() && !root.join("sub/new.txt").exists());
    walk(&mut s, 0, 7, &[b"sub"]).unwrap();
    call(
        &mut s,
        t(msg::TRENAME, |e| {
            e.u32(7).u32(0).string(b"sub2");
        }),
    )
    .unwrap();
    walk(&mut s, 7, 8, &[]).unwrap();
    call(
        &mut s,
        t(msg::TGETATTR, |e| {
            e.u32(8).u64(0x7ff);
        }),
    )
    .unwrap();
    assert!(root.join("sub2").is_dir());
    let r = call(
        &mut s,
        t(msg::TSTATFS, |e| {
            e.u32(0);
        }),
    )
    .unwrap();
    assert!(Decoder::new(&r[4..]).u32().unwrap() > 0, "block size");
    call(
        &mut s,
        t(msg::TCLUNK, |e| {
            e.u32(6);
        }),
    )
    .unwrap();
    assert_eq!(
        call(
            &mut s,
            t(msg::TCLUNK, |e| {
                e.u32(6);
            })
        ),
        Err(libc::EBADF)
    );
}

#[test]
fn nothing_outside_the_export_is_reachable() {
    let (dir, root) = export();
    std::os::unix::fs::symlink("/", root.join("to-root")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("to-secret")).unwrap();
    let mut s = Server::new(Some(&root), false).unwrap();
    attach(&mut s, 0);
    // `..` stops at the root: walking up twice then down finds the export's own file.
    assert_eq!(walk(&mut s, 0, 1, &[b"..", b"..", b"hello.txt"]), Ok(3));
    // A partial walk: how far it got, and no new fid.
    assert_eq!(walk(&mut s, 0, 2, &[b"..", b"secret"]), Ok(1));
    assert_eq!(walk(&mut s, 2, 9, &[]), Err(libc::EBADF));
    // Names with a slash, empty names, NUL.
    for bad in [&b"../secret"[..], b"sub/../..", b"", b"a\0b", b"."] {
        assert_eq!(walk(&mut s, 0, 9, &[bad]), Err(libc::EINVAL), "{bad:?}");
    }
    // A symlink is walked to (its qid) but never through, and never opened.
    assert_eq!(walk(&mut s, 0, 3, &[b"to-root", b"etc"]), Ok(1));
    walk(&mut s, 0, 3, &[b"to-root"]).unwrap();
    assert_eq!(lopen(&mut s, 3, libc::O_RDONLY), Err(libc::ELOOP));
    walk(&mut s, 0, 4, &[b"to-secret"]).unwrap();
    assert_eq!(lopen(&mut s, 4, libc::O_RDONLY), Err(libc::ELOOP));
    // chmod of a symlink is refused (the host would follow it).
    assert_eq!(
        call(
            &mut s,
            t(msg::TSETATTR, |e| {
                e.u32(4).u32(0x1).u32(0o777).u32(0).u32(0).u64(0);
                e.u64(0).u64(0).u64(0).u64(0);
            })
        ),
        Err(libc::EOPNOTSUPP)
    );
    // Creating through a symlinked directory fails; the target is untouched.
    assert!(call(
        &mut s,
        t(msg::TLCREATE, |e| {
            e.u32(3)
                .string(b"x")
                .u32(libc::O_RDWR as u32)
                .u32(0o644)
                .u32(0);
        })
    )
    .is_err());
    // A host directory swapped for a symlink under a fid does not lead out either.
    walk(&mut s, 0, 5, &[b"sub"]).unwrap();
    std::fs::remove_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink(dir.path(), root.join("sub")).unwrap();
    assert!(walk(&mut s, 5, 6, &[b"secret"]).is_err());
    assert_eq!(
        std::fs::read(dir.path().join("secret")).unwrap(),
        b"outside"
    );
    assert!(!dir.path().join("x").exists());
}

#[test]
fn a_read_only_export_refuses_every_change() {
    let (_dir, root) = export();
    let mut s = Server::new(Some(&root), true).unwrap();
    attach(&mut s, 0);
    walk(&mut s, 0, 1, &[b"hello.txt"]).unwrap();
    assert_eq!(lopen(&mut s, 1, libc::O_RDWR), Err(libc::EROFS));
    assert_eq!(
        lopen(&mut s, 1, libc::O_RDONLY | libc::O_TRUNC),
        Err(libc::EROFS)
    );
    lopen(&mut s, 1, libc::O_RDONLY).unwrap();
    assert_eq!(
        call(
            &mut s,
            t(msg::TWRITE, |e| {
                e.u32(1).u64(0).u32(1).bytes(b"x");
            })
        ),
        Err(libc::EBADF)
    );
    for req in [
        t(msg::TMKDIR, |e| {
            e.u32(0).string(b"d").u32(0o755).u32(0);
        }),
        t(msg::TUNLINKAT, |e| {
            e.u32(0).string(b"hello.txt").u32(0);
        }),
        t(msg::TLCREATE, |e| {
            e.u32(0).string(b"f").u32(1).u32(0o644).u32(0);
        }),
        t(msg::TRENAMEAT, |e| {
            e.u32(0).string(b"hello.txt").u32(0).string(b"h2");
        }),
    ] {
        assert_eq!(call(&mut s, req), Err(libc::EROFS));
    }
    assert_eq!(
        std::fs::read(root.join("hello.txt")).unwrap(),
        b"hello from the host"
    );
}

#[test]
fn an_unbound_slot_cannot_be_attached() {
    let mut s = Server::new(None, true).unwrap();
    call(
        &mut s,
        t(msg::TVERSION, |e| {
            e.u32(8192).string(b"9P2000.L");
        }),
    )
    .unwrap();
    assert_eq!(
        call(
            &mut s,
            t(msg::TATTACH, |e| {
                e.u32(0).u32(u32::MAX).string(b"").string(b"").u32(0);
            })
        ),
        Err(libc::ENOENT)
    );
}

fn device(root: &Path) -> P9 {
    P9::new(&FsConfig {
        tag: "smvol0".into(),
        root: Some(root.to_path_buf()),
        read_only: false,
    })
    .unwrap()
}

#[test]
fn the_device_answers_chains_and_says_its_tag() {
    let (_dir, root) = export();
    let mut dev = device(&root);
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg, b"\x06\x00smvol0");
    let mem = memory();
    let mut tq = TestQueue::new(0);
    let mut queues = vec![tq.queue()];
    let irq = Interrupt::new().unwrap();
    let req = t(msg::TVERSION, |e| {
        e.u32(1 << 20).string(b"9P2000.L");
    });
    let (out, inb) = (DATA_START, DATA_START + 0x1000);
    mem.write_slice(&req[..5], GuestAddress(out)).unwrap();
    mem.write_slice(&req[5..], GuestAddress(out + 0x100))
        .unwrap();
    tq.add_chain(
        &mem,
        &[
            (out, 5, false),
            (out + 0x100, (req.len() - 5) as u32, false),
            (inb, 64, true),
        ],
    );
    let mut ctx = QueueContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &irq,
    };
    dev.process_queue(&mut ctx, 0);
    assert_eq!(tq.used_idx(&mem), 1);
    let mut reply = [0u8; 21];
    mem.read_slice(&mut reply, GuestAddress(inb)).unwrap();
    assert_eq!(tq.used_elem(&mem, 0).1, 21);
    assert_eq!(reply[4], msg::TVERSION + 1);
    // msize is capped at ours.
    assert_eq!(
        u32::from_le_bytes(reply[7..11].try_into().unwrap()),
        MAX_MSIZE
    );
    assert_eq!(&reply[13..], b"9P2000.L");
}

/// A random but mostly well-formed 9P request: a real message type, small fids, names
/// from a dictionary that includes escapes.
fn random_request(rng: &mut impl Rng) -> Vec<u8> {
    const TYPES: &[u8] = &[
        msg::TVERSION,
        msg::TATTACH,
        msg::TWALK,
        msg::TWALK,
        msg::TWALK,
        msg::TLOPEN,
        msg::TLCREATE,
        msg::TREAD,
        msg::TWRITE,
        msg::TREADDIR,
        msg::TGETATTR,
        msg::TSETATTR,
        msg::TMKDIR,
        msg::TSYMLINK,
        msg::TMKNOD,
        msg::TLINK,
        msg::TRENAME,
        msg::TRENAMEAT,
        msg::TUNLINKAT,
        msg::TREMOVE,
        msg::TREADLINK,
        msg::TCLUNK,
        msg::TSTATFS,
        msg::TFSYNC,
        msg::TLOCK,
        msg::TGETLOCK,
        msg::TXATTRWALK,
        msg::TFLUSH,
        0,
        255,
    ];
    const NAMES: &[&[u8]] = &[
        b"a",
        b"b",
        b"sub",
        b"hello.txt",
        b"..",
        b".",
        b"",
        b"../secret",
        b"/etc",
        b"x/y",
        b"to-root",
        b"\0",
    ];
    let kind = TYPES[rng.gen_range(0..TYPES.len())];
    let mut e = Encoder::new(kind, rng.gen());
    let fid = |rng: &mut dyn rand::RngCore| rng.gen_range(0u32..6);
    let fields = rng.gen_range(0..8);
    for _ in 0..fields {
        match rng.gen_range(0..6) {
            0 => {
                e.u32(fid(rng));
            }
            1 => {
                e.string(NAMES[rng.gen_range(0..NAMES.len())]);
            }
            2 => {
                e.u32(rng.gen::<u32>() % 0x2_0000);
            }
            3 => {
                e.u64(rng.gen_range(0..4096));
            }
            4 => {
                e.u16(rng.gen_range(0..4));
            }
            _ => {
                let n = rng.gen_range(0..64);
                e.u32(n);
                let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                e.bytes(&junk);
            }
        }
    }
    let mut m = e.finish();
    if rng.gen_bool(0.05) {
        // Now and then a size field that lies.
        let lie: u32 = rng.gen();
        m[..4].copy_from_slice(&lie.to_le_bytes());
    }
    m
}

/// Random descriptor chains carrying random requests: the device must never panic, never
/// write outside guest memory or the export, and keep the used ring consistent.
#[test]
fn fuzz_random_descriptor_chains() {
    let (dir, root) = export();
    std::os::unix::fs::symlink("/", root.join("to-root")).unwrap();
    let mut dev = device(&root);
    let mem = memory();
    let irq = Interrupt::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x09f5_2000);
    let mut tq = TestQueue::new(0);
    let mut queues = vec![tq.queue()];
    let iterations = 100_000;
    let mut valid = 0u16;
    let shape = ChainFuzz {
        area: (DATA_START, 0x8000),
        max_len: 512,
        max_descs: 4,
        p_write: 0.5,
        p_indirect: 0.03,
    };
    // A session most chains can use: version and attach of fid 0 arrive now and then.
    attach(dev.server_for_tests(), 0);
    for _ in 0..iterations {
        let (head, addrs) = tq.write_random_chain(&mem, &mut rng, &shape);
        if let Some(&addr) = addrs.first() {
            let req = random_request(&mut rng);
            if rng.gen_bool(0.9) && fits(addr, req.len()) {
                mem.write_slice(&req, GuestAddress(addr)).unwrap();
            }
        }
        let real = tq.publish_fuzzed(&mem, &mut rng, head);
        valid = valid.wrapping_add(u16::from(real));
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            interrupt: &irq,
        };
        dev.process_queue(&mut ctx, 0);
    }
    assert_eq!(queues[0].next_avail(), iterations as u16);
    assert_eq!(tq.used_idx(&mem), valid);
    assert!(dev.fids_in_use() <= MAX_FIDS);
    // Outside the export: still exactly what was there.
    let mut outside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    outside.sort();
    assert_eq!(outside, ["export", "secret"]);
    assert_eq!(
        std::fs::read(dir.path().join("secret")).unwrap(),
        b"outside"
    );
}
