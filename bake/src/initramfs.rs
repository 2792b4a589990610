//! The per-image initramfs: an uncompressed newc cpio (the kernel unpacks it without
//! decompression, which matters under emulation) holding `/init` and the run config.

use std::io::{self, Write};

use supermachine_protocol::{RunConfig, CONFIG_PATH};

/// One member of the archive.
enum Member<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

struct NewcWriter<W> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> NewcWriter<W> {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..rem])
    }

    fn member(&mut self, m: &Member<'_>) -> io::Result<()> {
        match *m {
            Member::Dir { path, mode } => self.header(path, 0o040000 | mode, 0, (0, 0)),
            Member::File { path, mode, data } => {
                self.header(path, 0o100000 | mode, data.len(), (0, 0))?;
                self.put(data)?;
                self.pad()
            }
            Member::CharDev {
                path,
                mode,
                major,
                minor,
            } => self.header(path, 0o020000 | mode, 0, (major, minor)),
        }
    }

    fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        Ok(self.out)
    }
}

/// Writes the initramfs for one image: `init` (the guest's PID 1), the agent `shim` (when
/// given) and `config`.
pub fn write<W: Write>(
    out: W,
    init: &[u8],
    shim: Option<&[u8]>,
    config: &RunConfig,
) -> io::Result<W> {
    let config_json = config.to_json();
    let config_path = CONFIG_PATH.trim_start_matches('/');
    let config_dir = config_path
        .rsplit_once('/')
        .map(|(d, _)| d)
        .unwrap_or("supermachine");
    let members = [
        Member::Dir {
            path: "dev",
            mode: 0o755,
        },
        // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
        Member::CharDev {
            path: "dev/console",
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Member::Dir {
            path: "proc",
            mode: 0o755,
        },
        Member::Dir {
            path: "sys",
            mode: 0o755,
        },
        Member::Dir {
            path: "newroot",
            mode: 0o755,
        },
        Member::Dir {
            path: config_dir,
            mode: 0o755,
        },
        Member::File {
            path: "init",
            mode: 0o755,
            data: init,
        },
        Member::File {
            path: config_path,
            mode: 0o644,
            data: &config_json,
        },
    ];
    let mut w = NewcWriter {
        out,
        ino: 0,
        written: 0,
    };
    for m in &members {
        w.member(m)?;
    }
    if let Some(shim) = shim {
        w.member(&Member::File {
            path: "shim",
            mode: 0o755,
            data: shim,
        })?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let cfg = RunConfig {
            argv: vec!["/bin/true".into()],
            env: vec![],
            workdir: "/".into(),
            user: String::new(),
            hostname: "h".into(),
            layers: vec![],
            volumes: vec![],
        };
        let buf = write(Vec::new(), b"\x7fELF-ish", Some(b"shim"), &cfg).unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let trailer = b"TRAILER!!!\0";
        assert!(buf.windows(trailer.len()).any(|w| w == trailer));
        // Every header starts on a 4-byte boundary: find them all and check.
        let mut pos = 0;
        let mut names = Vec::new();
        while pos < buf.len() {
            assert_eq!(&buf[pos..pos + 6], b"070701", "header at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[pos + 6 + i * 8..pos + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&buf[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (pos + 110 + namesize + 3) & !3;
            pos = (data_start + size + 3) & !3;
            let done = name == "TRAILER!!!";
            names.push(name);
            if done {
                break;
            }
        }
        assert_eq!(pos, buf.len());
        assert!(names.contains(&"init".to_string()));
        assert!(names.contains(&"shim".to_string()));
        assert!(names.contains(&"supermachine/config.json".to_string()));
    }
}
